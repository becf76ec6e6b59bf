"""Training batches from a SeqIO task or mixture, a pure function of the step.

Dimension names (moe_jax's glossary): B global batch (examples), P
processes, J data shards.

The global batch of step t is the concatenation, over data shards
j = 0 .. J-1, of the t-th batch of B / J examples of shard j; each shard is a
deterministic stream (seqio `ShardInfo(j, J)`, shuffled with the run's seed,
repeated). Process p of P reads only its own J / P shards, the rows that
land on its devices. So:

* a run resumed at step t sees exactly the batches an uninterrupted run sees
  (exact resume);
* P processes together see exactly the examples one process sees with the
  same J, and no two processes read the same example.

Resuming at step t costs O(1) in the input pipeline when the stream's
position at t was saved (`save_position`, which `Checkpointer` calls with
every checkpoint: the tf.data iterator state of each shard, shuffle buffer
included): `restore_position` continues from there. Without a saved
position the stream replays from step 0.

`ArrayStream` keeps the batches of a run of bounded length once read, so
runs that share a data config (a study's models of one seed) read the
pipeline once.

Imports seqio and TensorFlow; the model code does not.
"""

from __future__ import annotations

import dataclasses
import enum
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Optional

import gin
import numpy as np
import seqio
import tensorflow as tf
from etils import epath

from moe_jax import knobs

Batch = dict[str, np.ndarray]


class Objective(str, enum.Enum):
  """Feature converter: ENC_DEC (T5 inputs -> targets), PREFIX_LM (decoder
  only: inputs are a bidirectional prefix, loss on targets), LM (decoder
  only, loss on the whole concatenated sequence)."""
  ENC_DEC = "enc_dec"
  PREFIX_LM = "prefix_lm"
  LM = "lm"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Attributes:
    mixture_or_task_name: a registered SeqIO task or mixture.
    task_feature_lengths: {"inputs": Li, "targets": Lt} in tokens.
    batch_size: B, global examples per step (packed rows when `pack`).
    split: the split to train on.
    objective: `Objective`.
    pack: pack several examples into a row (seqio packing).
    num_shards: J data shards; 0 means one per process. Keep J fixed to get
      the same batches with a different number of processes.
    seed: shuffle seed (the same seed gives the same batches).
  """
  mixture_or_task_name: str = gin.REQUIRED
  task_feature_lengths: Mapping[str, int] = gin.REQUIRED
  batch_size: int = 32
  split: str = "train"
  objective: Objective = Objective.ENC_DEC
  pack: bool = True
  num_shards: int = 0
  seed: int = 0

  def __post_init__(self):
    knobs.choice(Objective, "objective", self.objective)
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1; got batch_size="
                       f"{self.batch_size}")
    if self.num_shards < 0:
      raise ValueError(f"num_shards must be >= 0; got num_shards="
                       f"{self.num_shards}")
    for key in ("inputs", "targets"):
      if self.task_feature_lengths.get(key, 1) < 1:
        raise ValueError(f"task_feature_lengths[{key!r}] must be >= 1; got "
                         f"{dict(self.task_feature_lengths)}")

  def shards(self, process_count: int) -> int:
    """J for a job of `process_count` processes (checked)."""
    shards = self.num_shards or process_count
    if shards % process_count or self.batch_size % shards:
      raise ValueError(
          f"num_shards={shards} must be a multiple of the {process_count} "
          f"processes and divide batch_size={self.batch_size}")
    return shards


def feature_converter(objective: Objective, pack: bool
                      ) -> seqio.FeatureConverter:
  """The seqio converter for `objective` (model features as the models take
  them: T5X names, segment ids and positions when packed)."""
  objective = knobs.choice(Objective, "objective", objective)
  if objective == Objective.ENC_DEC:
    return seqio.EncDecFeatureConverter(pack=pack)
  if objective == Objective.PREFIX_LM:
    return seqio.PrefixLMFeatureConverter(pack=pack)
  return seqio.LMFeatureConverter(pack=pack)


def _shard_stream(config: DataConfig, shard: int, num_shards: int
                  ) -> Iterator[Mapping[str, tf.Tensor]]:
  dataset = seqio.get_dataset(
      config.mixture_or_task_name,
      task_feature_lengths=dict(config.task_feature_lengths),
      dataset_split=config.split, shuffle=True, num_epochs=None,
      feature_converter=feature_converter(config.objective, config.pack),
      shard_info=seqio.ShardInfo(shard, num_shards), seed=config.seed,
      use_cached=False, verbose=False)
  dataset = dataset.batch(config.batch_size // num_shards, drop_remainder=True)
  return iter(dataset)


class BatchStream:
  """`stream(step)` -> this process's rows of the global batch of `step`.

  Steps are normally asked for in order; asking again for the last step
  returns it without reading; after `restore_position(t, ...)` step t is
  read next without replaying; asking for an earlier step (or starting
  after a resume without a saved position) replays the streams from the
  start and skips, so the answer never depends on what was asked before.
  """

  def __init__(self, config: DataConfig, process_index: int = 0,
               process_count: int = 1):
    self.config = config
    self.process_index, self.process_count = process_index, process_count
    self._unsaveable = False
    num_shards = config.shards(process_count)
    per_process = num_shards // process_count
    self._shards = range(process_index * per_process,
                         (process_index + 1) * per_process)
    self._num_shards = num_shards
    self._streams: Optional[list[Iterator[Batch]]] = None
    self._next_step = 0
    self._last: Optional[Batch] = None

  @property
  def rows_per_process(self) -> int:
    return self.config.batch_size * len(self._shards) // self._num_shards

  def _restart(self) -> None:
    self._streams = [_shard_stream(self.config, s, self._num_shards)
                     for s in self._shards]
    self._next_step = 0

  def __call__(self, step: int) -> Batch:
    if self._last is not None and step == self._next_step - 1:
      return self._last
    if self._streams is None or step < self._next_step:
      self._restart()
    while True:
      parts = [next(stream) for stream in self._streams]
      self._next_step += 1
      if self._next_step > step:
        break
    self._last = {k: np.concatenate([p[k].numpy() for p in parts])
                  for k in parts[0]}
    return self._last

  def _position_file(self, directory: epath.Path) -> epath.Path:
    return directory / f"process_{self.process_index}"

  def save_position(self, step: int, directory: epath.Path) -> bool:
    """Writes where the streams stand, if that is `step` (the next batch
    is step's), as `directory`/process_<p>.{index,data-*} (any filesystem
    epath reaches); returns whether it did. A pipeline tf.data cannot
    checkpoint (a stateful `tf.py_function` or `from_generator` source) is
    said once and not saved: its resumes replay."""
    if self._streams is None or self._next_step != step or self._unsaveable:
      return False
    with tempfile.TemporaryDirectory() as local:
      prefix = Path(local) / "position"
      try:
        tf.train.Checkpoint(**self._trackables()).write(str(prefix))
      except tf.errors.FailedPreconditionError as e:
        self._unsaveable = True
        print(f"{self.config.mixture_or_task_name}: the data position "
              "cannot be saved, so a resume replays the stream from step 0 "
              f"({(str(e).strip().splitlines() or [''])[0][:200]})",
              flush=True)
        return False
      directory.mkdir(parents=True, exist_ok=True)
      for file in Path(local).iterdir():
        name = file.name.replace("position", self._position_file(
            directory).name, 1)
        (directory / name).write_bytes(file.read_bytes())
    return True

  def restore_position(self, step: int, directory: epath.Path) -> bool:
    """Continues the streams from the position `save_position(step,
    directory)` wrote; returns False (leaving the stream to replay) when
    there is none.

    Raises:
      ValueError: the saved position does not fit these streams (another
        data config) or is damaged; names its files and the `rm -r` that
        falls back to a replay.
    """
    base = self._position_file(directory)
    files = list(directory.glob(base.name + ".*")) if directory.exists() else []
    if not any(f.name.endswith(".index") for f in files):
      return False
    self._restart()
    with tempfile.TemporaryDirectory() as local:
      for file in files:
        name = file.name.replace(base.name, "position", 1)
        (Path(local) / name).write_bytes(file.read_bytes())
      try:
        tf.train.Checkpoint(**self._trackables()).read(
            str(Path(local) / "position")).assert_consumed()
      except (tf.errors.OpError, AssertionError, ValueError) as e:
        cause = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"the data position of step {step} ({base}.*) could not be "
            f"restored: {type(e).__name__}: {cause}\nDelete it to replay "
            f"the stream from step 0 instead: rm -r {directory}") from e
    self._next_step, self._last = step, None
    return True

  def _trackables(self) -> dict[str, Iterator]:
    return {f"shard_{j}": stream for j, stream in zip(self._shards,
                                                      self._streams)}


class ArrayStream:
  """`stream(step)` -> the batch of `step`, from batches read before
  (`read`) and kept in memory, or in a .npz file (`save` / `load`).

  For runs of bounded length that share a data config (a study's models
  of one seed and stage): the SeqIO pipeline is built and read once for all
  of them. Its batches equal `BatchStream(config, p, P)`'s, step for step.
  Its position is the step, so a resume reads nothing again: `save_position`
  writes nothing and `restore_position` always succeeds.

  Attributes:
    config: the data config the batches were read with.
    process_index, process_count: whose rows they are (p of P).
    num_steps: T, the steps held.
  """

  def __init__(self, config: DataConfig, batches: Mapping[str, np.ndarray],
               process_index: int = 0, process_count: int = 1):
    """`batches`: feature -> [T, rows per process, ...]."""
    lengths = {v.shape[0] for v in batches.values()}
    if len(lengths) != 1:
      raise ValueError("every feature must hold as many steps; got "
                       f"{ {k: v.shape for k, v in batches.items()} }")
    self.config = config
    self.process_index, self.process_count = process_index, process_count
    self.num_steps = lengths.pop()
    self._batches = dict(batches)

  @classmethod
  def read(cls, config: DataConfig, num_steps: int, process_index: int = 0,
           process_count: int = 1) -> "ArrayStream":
    """The first `num_steps` batches of `BatchStream(config, p, P)`."""
    stream = BatchStream(config, process_index, process_count)
    steps = [stream(step) for step in range(num_steps)]
    return cls(config, {k: np.stack([b[k] for b in steps])
                        for k in steps[0]}, process_index, process_count)

  def save(self, path: Path) -> None:
    """Writes the batches to `path` (.npz), atomically."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
      np.savez(f, **self._batches)
    partial.replace(path)

  @classmethod
  def load(cls, config: DataConfig, path: Path, process_index: int = 0,
           process_count: int = 1) -> "ArrayStream":
    """The batches `save` wrote to `path`; `config` and p of P must be
    those they were read with (the file does not record them)."""
    with np.load(path) as arrays:
      return cls(config, {k: arrays[k] for k in arrays.files},
                 process_index, process_count)

  def __call__(self, step: int) -> Batch:
    if not 0 <= step < self.num_steps:
      raise IndexError(f"step {step} is outside the {self.num_steps} steps "
                       f"read of {self.config.mixture_or_task_name}")
    return {k: v[step] for k, v in self._batches.items()}

  def save_position(self, step: int, directory: epath.Path) -> bool:
    del step, directory
    return True

  def restore_position(self, step: int, directory: epath.Path) -> bool:
    del step, directory
    return True


# Keep TF from grabbing accelerators that JAX uses.
tf.config.set_visible_devices([], "GPU")
