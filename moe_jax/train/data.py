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

Imports seqio and TensorFlow; the model code does not.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterator, Mapping, Optional

import gin
import numpy as np
import seqio
import tensorflow as tf

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
                  ) -> Iterator[Batch]:
  dataset = seqio.get_dataset(
      config.mixture_or_task_name,
      task_feature_lengths=dict(config.task_feature_lengths),
      dataset_split=config.split, shuffle=True, num_epochs=None,
      feature_converter=feature_converter(config.objective, config.pack),
      shard_info=seqio.ShardInfo(shard, num_shards), seed=config.seed,
      use_cached=False, verbose=False)
  dataset = dataset.batch(config.batch_size // num_shards, drop_remainder=True)
  return iter(dataset.as_numpy_iterator())


class BatchStream:
  """`stream(step)` -> this process's rows of the global batch of `step`.

  Steps are normally asked for in order; asking again for the last step
  returns it without reading; asking for an earlier step (or starting after
  a resume) replays the streams from the start and skips, so the answer
  never depends on what was asked before.
  """

  def __init__(self, config: DataConfig, process_index: int = 0,
               process_count: int = 1):
    self.config = config
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
    self._last = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return self._last


# Keep TF from grabbing accelerators that JAX uses.
tf.config.set_visible_devices([], "GPU")
