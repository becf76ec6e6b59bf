"""File sources (JSONL, TSV, TFRecord) for seqio, with precise errors.

Files are read when a dataset is first requested; a malformed line (bad
columns, JSON or UTF-8) raises a ValueError naming the file and the 1-based
line (or record) number, and a split file without examples one naming the
file (an empty file would otherwise drop its task from a mixture: rate 0).
"""

import json
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import seqio
import tensorflow as tf

from moe_jax import paths
from moe_jax.text import text_lines
from tasks import data_dir

Example = Dict[str, str]


def read_jsonl(path: str, fields: Sequence[str]) -> Iterator[Example]:
  """Yields {field: str} per non-empty line; every field must be present."""
  for lineno, line in text_lines(path):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{lineno}: expected a JSON object")
    missing = [k for k in fields if k not in record]
    if missing:
      raise ValueError(f"{path}:{lineno}: missing field(s) {missing}")
    yield {k: str(record[k]) for k in fields}


def read_tsv(path: str, fields: Sequence[str]) -> Iterator[Example]:
  """Yields {field: str} per non-empty line of exactly len(fields) columns."""
  for lineno, line in text_lines(path):
    line = line.rstrip("\n").rstrip("\r")
    if not line:
      continue
    cols = line.split("\t")
    if len(cols) != len(fields):
      raise ValueError(f"{path}:{lineno}: expected {len(fields)} "
                       f"tab-separated columns {list(fields)}, got "
                       f"{len(cols)}")
    yield dict(zip(fields, cols))


def read_tfrecord(path: str, fields: Sequence[str]) -> Iterator[Example]:
  """Yields {field: str} per tf.train.Example record (bytes features)."""
  records = tf.data.TFRecordDataset(path).as_numpy_iterator()
  for index, record in enumerate(records, 1):
    try:
      feature = tf.train.Example.FromString(record).features.feature
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{path}: record {index}: not a tf.train.Example") from e
    missing = [k for k in fields if not feature[k].bytes_list.value]
    if missing:
      raise ValueError(f"{path}: record {index}: missing bytes feature(s) "
                       f"{missing}")
    yield {k: feature[k].bytes_list.value[0].decode("utf-8") for k in fields}


READERS: Dict[str, Callable[[str, Sequence[str]], Iterator[Example]]] = {
    "jsonl": read_jsonl, "tsv": read_tsv, "tfrecord": read_tfrecord}


class FileDataSource(seqio.FunctionDataSource):
  """One file per split under data_dir(), read in full at first use.

  `split_files` maps split -> path relative to the data directory; the
  format is the file extension (jsonl, tsv or tfrecord). Examples are dicts
  of strings with keys `fields`.
  """

  def __init__(self, split_files: Dict[str, str], fields: Sequence[str],
               description: str):
    for path in split_files.values():
      if path.rsplit(".", 1)[-1] not in READERS:
        raise ValueError(f"split_files: unknown format of {path!r}; "
                         f"expected one of {sorted(READERS)}")
    self._split_files = dict(split_files)
    self._fields = tuple(fields)
    self._description = description
    self._counts: Dict[Tuple[str, Tuple[int, int]], int] = {}
    super().__init__(self._dataset, splits=tuple(split_files))

  def examples(self, split: str) -> List[Example]:
    rel = self._split_files[split]
    path = data_dir.require_file(rel, self._description)
    rows = list(READERS[rel.rsplit(".", 1)[-1]](path, self._fields))
    if not rows:
      raise ValueError(f"{path}: no examples in the {split!r} split of "
                       f"{self._description}; the file is empty (a partial "
                       "copy?). Copy it again, or leave its task out")
    return rows

  def _dataset(self, split: str, shuffle_files: bool, seed=None
               ) -> tf.data.Dataset:
    del shuffle_files, seed  # One file per split, read in order.
    rows = self.examples(split)
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.constant([r[k] for r in rows], tf.string)
         for k in self._fields})

  def num_input_examples(self, split: str) -> int:
    """Examples in the split's file, counted once per version of the file."""
    path = data_dir.require_file(self._split_files[split], self._description)
    key = (path, paths.version(path))
    if key not in self._counts:
      self._counts[key] = len(self.examples(split))
    return self._counts[key]
