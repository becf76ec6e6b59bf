"""A JSONL or TSV file source, streamed, optionally mixed by task.

A file may hold the examples of many tasks (a task field per line, e.g.
the FLAN exports' `task_name`). Each epoch then draws min(n_t, cap)
examples of every task t, so a task's share of the stream is
min(n_t, cap) / sum over tasks of min(n, cap) -- the capped
example-proportional mixing of FLAN, by task rather than by file. A file
without a task field is one task, read whole each epoch (its cap, if any,
belongs to its mixture's rate, as in FLAN).

Which examples an epoch draws and in what order they come is decided by a
hash of each line's bytes with the seed and the epoch number, never by the
line's position: the same lines in another order give the same stream. Host
j of J reads every J-th example of that order (by seeking to it), so a host
parses only its own share. The file is indexed once (`line_index`), in
one streaming pass; no file is ever held in memory.
"""

from typing import (Callable, Dict, Iterator, Mapping, Optional, Sequence,
                    Tuple)

import numpy as np
import seqio
import tensorflow as tf

from moe_jax import paths
from tasks import data_dir
from tasks import line_formats
from tasks import line_index

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser, elementwise on <uint64>[...]."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def epoch_lines(index: line_index.LineIndex, cap: Optional[int], seed: int,
                epoch: int, shuffle: bool) -> np.ndarray:
  """<int64>[M] line numbers of one epoch, M = sum over tasks of
  min(n_t, cap) (every line when `cap` is None): each task's lines of
  smallest hash key, ordered by key (shuffle) or by position in the file
  (no shuffle)."""
  if cap is None:
    cap = len(index.offsets)
  salt = _mix(_mix(np.array([seed % 2**64], np.uint64) * _GOLDEN) ^
              (np.array([epoch], np.uint64) * _GOLDEN))
  keys = _mix(index.fingerprints ^ salt)
  by_task = np.lexsort((keys, index.groups))
  groups = index.groups[by_task]
  starts = np.searchsorted(groups, groups, side="left")
  chosen = by_task[np.arange(len(groups)) - starts < cap]
  if shuffle:
    return chosen[np.argsort(keys[chosen], kind="stable")]
  return np.sort(chosen)


class CappedFileSource(seqio.DataSource):
  """One JSONL or TSV file (`relative_path` under data_dir(); the format is
  its extension) of one or several tasks. Only the "train" split.

  `fields` are the string fields of each example (a TSV's columns, in
  order). `task_field` names the task of a file of several, and `cap()` is
  the examples-per-task cap (read at each use, so gin can set it); both
  None for a file of one task.
  """

  def __init__(self, relative_path: str, fields: Sequence[str],
               description: str, *, task_field: Optional[str] = None,
               cap: Optional[Callable[[], int]] = None):
    line_formats.parse(relative_path)  # a known format
    if (task_field is None) != (cap is None):
      raise ValueError(f"{relative_path}: task_field and cap go together "
                       f"(got task_field={task_field!r}, cap={cap!r})")
    if task_field is not None and task_field not in fields:
      raise ValueError(f"task_field {task_field!r} must be one of {fields}")
    self._relative_path = relative_path
    self._fields = tuple(fields)
    self._task_field = task_field
    self._cap = cap
    self._description = description
    self._indices: Dict[Tuple[str, Tuple[int, int]],
                        line_index.LineIndex] = {}
    super().__init__(splits=("train",))

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return True

  def list_shards(self, split: str) -> Sequence[str]:
    return [self.path()]

  def path(self) -> str:
    return data_dir.require_file(self._relative_path, self._description)

  def cap(self) -> Optional[int]:
    """Examples per task in an epoch (None: all of them)."""
    return self._cap() if self._cap else None

  def index(self) -> line_index.LineIndex:
    """The file's index, rebuilt when the data dir or the file changes;
    ValueError naming the file when it has no example."""
    path = self.path()
    key = (path, paths.version(path))
    if key not in self._indices:
      index = line_index.load_or_build(path, self._fields, self._task_field)
      if not len(index.offsets):
        raise ValueError(f"{path}: no examples in {self._description}; the "
                         "file is empty (a partial copy?). Copy it again, or "
                         "leave its task out")
      self._indices = {key: index}
    return self._indices[key]

  def task_counts(self) -> Dict[str, int]:
    """{task name: examples in the file} ({"": n} for a file of one task)."""
    return self.index().counts()

  def capped_counts(self) -> Dict[str, int]:
    """{task name: min(examples, cap)}: what one epoch holds of each."""
    cap = self.cap()
    return {t: n if cap is None else min(n, cap)
            for t, n in self.task_counts().items()}

  def num_input_examples(self, split: str) -> int:
    return sum(self.capped_counts().values())

  def _read(self, lines: np.ndarray) -> Iterator[Mapping[str, str]]:
    path, offsets = self.path(), self.index().offsets
    parse = line_formats.parse(path)
    with paths.as_path(path).open("rb") as f:
      for line in lines:
        offset = int(offsets[line])
        f.seek(offset)
        where = f"{path}: line at byte {offset}"
        # Every line was decoded and checked when this version was indexed.
        yield parse(f.readline().decode("utf-8"), self._fields, where)

  def get_dataset(self, split: str = "train", shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None,
                  **unused) -> tf.data.Dataset:
    """Epoch after epoch (a fresh draw each time the dataset is repeated),
    host `shard_info.index` of `shard_info.num_shards` reading its share."""
    del unused
    if split != "train":
      raise ValueError(f"{self._relative_path}: only the train split exists; "
                       f"got split={split!r}")
    shard = shard_info or seqio.ShardInfo(0, 1)
    epochs = iter(range(2**62))
    index = self.index()  # here, so a bad file is a plain error, not tf's

    def generate():
      lines = epoch_lines(index, self.cap(), seed or 0,
                          next(epochs) if shuffle else 0, shuffle)
      yield from self._read(lines[shard.index::shard.num_shards])

    return tf.data.Dataset.from_generator(
        generate, output_signature={
            k: tf.TensorSpec([], tf.string) for k in self._fields})
