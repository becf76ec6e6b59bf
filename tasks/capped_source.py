"""A JSONL source mixed by task: per-task caps, order-free shuffle, sharding.

One file holds the examples of many tasks (a `task_name` field per line).
Each epoch draws min(n_t, cap) examples of every task t, so a task's share of
the stream is min(n_t, cap) / sum over tasks of min(n, cap) -- the capped
example-proportional mixing of FLAN, by task rather than by file.

Which examples an epoch draws and in what order they come is decided by a
hash of each line's bytes with the seed and the epoch number, never by the
line's position: the same lines in another order give the same stream. Host
j of J reads every J-th example of that order (by seeking to it), so a host
parses only its own share. The file is indexed once (`line_index`).
"""

import json
from typing import (Callable, Dict, Iterator, Mapping, Optional, Sequence,
                    Tuple)

import numpy as np
import seqio
import tensorflow as tf

from moe_jax import paths
from tasks import data_dir
from tasks import line_index

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser, elementwise on <uint64>[...]."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def epoch_lines(index: line_index.LineIndex, cap: int, seed: int, epoch: int,
                shuffle: bool) -> np.ndarray:
  """<int64>[M] line numbers of one epoch, M = sum over tasks of
  min(n_t, cap): each task's lines of smallest hash key, ordered by key
  (shuffle) or by position in the file (no shuffle)."""
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


class CappedJsonlSource(seqio.DataSource):
  """One JSONL file (`relative_path` under data_dir()) of several tasks.

  `fields` are the string fields of each example; `task_field` names the
  task; `cap()` is the examples-per-task cap (read at each use, so gin can
  set it). Only the "train" split.
  """

  def __init__(self, relative_path: str, fields: Sequence[str],
               task_field: str, cap: Callable[[], int], description: str):
    if task_field not in fields:
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

  def index(self) -> line_index.LineIndex:
    """The file's index, rebuilt when the data dir or the file changes."""
    path = self.path()
    key = (path, paths.version(path))
    if key not in self._indices:
      self._indices = {key: line_index.load_or_build(path, self._task_field)}
    return self._indices[key]

  def task_counts(self) -> Dict[str, int]:
    """{task name: examples in the file}."""
    return self.index().counts()

  def capped_counts(self) -> Dict[str, int]:
    """{task name: min(examples, cap)}: what one epoch holds of each."""
    cap = self._cap()
    return {t: min(n, cap) for t, n in self.task_counts().items()}

  def num_input_examples(self, split: str) -> int:
    return sum(self.capped_counts().values())

  def _read(self, lines: np.ndarray) -> Iterator[Mapping[str, str]]:
    path, offsets = self.path(), self.index().offsets
    with paths.as_path(path).open("rb") as f:
      for line in lines:
        f.seek(int(offsets[line]))
        record = json.loads(f.readline())
        missing = [k for k in self._fields if k not in record]
        if missing:
          raise ValueError(f"{path}: line at byte {int(offsets[line])}: "
                           f"missing field(s) {missing}")
        yield {k: str(record[k]) for k in self._fields}

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
      lines = epoch_lines(index, self._cap(), seed or 0,
                          next(epochs) if shuffle else 0, shuffle)
      yield from self._read(lines[shard.index::shard.num_shards])

    return tf.data.Dataset.from_generator(
        generate, output_signature={
            k: tf.TensorSpec([], tf.string) for k in self._fields})
