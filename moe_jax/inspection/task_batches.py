"""Model features of a registered SeqIO task or mixture, one batch per task,
for the routing analyses (`analyses.Batches`: utilization per task of a
mixture).

Dimension names (moe_jax's glossary): N examples per task, Li input length,
Lt target length.

Each task's first N examples of a split, unshuffled, go through the
feature converter the trainer uses for the checkpoint's architecture
(unpacked, padded to `task_feature_lengths`), so every task's batch has the
same features and lengths and the batches can be joined.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import seqio

from moe_jax.inspection.checkpoint import Checkpoint
from moe_jax.models import Architecture
from moe_jax.text import Vocabulary
from moe_jax.train.data import Objective, feature_converter

Batch = dict[str, np.ndarray]
DEFAULT_FEATURE_LENGTHS = {"inputs": 128, "targets": 64}


def default_objective(checkpoint: Checkpoint) -> Objective:
  """ENC_DEC for an encoder-decoder; PREFIX_LM (inputs, then targets, as
  `routing_report.text_batch` feeds text) for a decoder-only model."""
  if Architecture(checkpoint.config.architecture) == (
      Architecture.DECODER_ONLY):
    return Objective.PREFIX_LM
  return Objective.ENC_DEC


def leaf_tasks(mixture_or_task_name: str) -> list[seqio.Task]:
  """The tasks of a registered mixture (sub-mixtures flattened, sorted by
  name as seqio lists them), or [the task]."""
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  if isinstance(provider, seqio.Mixture):
    return list(provider.tasks)
  return [provider]


def task_batches(checkpoint: Checkpoint, mixture_or_task_name: str, *,
                 split: str = "validation", examples_per_task: int = 32,
                 task_feature_lengths: Optional[Mapping[str, int]] = None,
                 objective: Optional[Objective] = None
                 ) -> dict[str, Batch]:
  """task name -> model features (<[N, Li]>, <[N, Lt]> arrays) of its
  first `examples_per_task` examples of `split`.

  Raises:
    ValueError: `examples_per_task` < 1, or a task yields no example.
  """
  if examples_per_task < 1:
    raise ValueError(f"examples_per_task must be >= 1; got "
                     f"examples_per_task={examples_per_task}")
  lengths = dict(task_feature_lengths or DEFAULT_FEATURE_LENGTHS)
  converter = feature_converter(objective or default_objective(checkpoint),
                                pack=False)
  out = {}
  for task in leaf_tasks(mixture_or_task_name):
    dataset = seqio.get_dataset(
        task.name, task_feature_lengths=lengths, dataset_split=split,
        shuffle=False, num_epochs=1, feature_converter=converter,
        use_cached=False, verbose=False)
    rows = list(dataset.take(examples_per_task).as_numpy_iterator())
    if not rows:
      raise ValueError(f"task {task.name} (of {mixture_or_task_name}) has no "
                       f"example in split {split!r}")
    out[task.name] = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  return out


def joined(batches: Mapping[str, Batch]) -> Batch:
  """Every task's examples in one batch (task after task)."""
  first = next(iter(batches.values()))
  return {k: np.concatenate([b[k] for b in batches.values()])
          for k in first}


def task_vocabulary(mixture_or_task_name: str) -> Vocabulary:
  """The targets vocabulary of the first task (to show token text)."""
  task = leaf_tasks(mixture_or_task_name)[0]
  return task.output_features["targets"].vocabulary
