"""Warm start: a fresh run's parameters filled from another checkpoint
(`TrainConfig.init_checkpoint`) before its first step.

Only parameters are taken; the optimizer state and the step start anew.
"""

from __future__ import annotations

import enum
import re
from typing import Any

import jax
import numpy as np

from moe_jax.param_paths import flat_params, param_path
from moe_jax.train import checkpoints, upcycle


class InitMode(str, enum.Enum):
  """How `TrainConfig.init_checkpoint` fills the fresh parameters.

  MATCHING: copy every parameter whose path matches `init_params_include`
    and exists with the same shape in the checkpoint (partial restore by
    name: e.g. fine-tune from pre-training, or keep a fresh head).
  UPCYCLE: the checkpoint is a dense model; experts are copies of its FFNs
    and routers stay fresh (`moe_jax.train.upcycle`).
  """
  MATCHING = "matching"
  UPCYCLE = "upcycle"


def init_params_from(fresh: Any, source: Any, mode: InitMode,
                     include: str) -> tuple[Any, list[str]]:
  """`fresh` params (host arrays) filled from `source`; also the names of
  the parameters that were copied (UPCYCLE: every parameter).

  Args:
    fresh: the new model's initialized parameters.
    source: the checkpoint's parameters.
    mode: `InitMode`.
    include: regex over parameter names (MATCHING only).
  """
  if InitMode(mode) == InitMode.UPCYCLE:
    merged = upcycle.upcycle(source, fresh)
    return merged, sorted(flat_params(merged))
  pattern = re.compile(include)
  source_flat = flat_params(source)
  copied = []

  def fill(path, leaf):
    name = param_path(path)
    value = source_flat.get(name)
    if (value is not None and pattern.fullmatch(name) and
        np.shape(value) == leaf.shape):
      copied.append(name)
      return np.asarray(value, leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(fill, fresh), copied


def from_checkpoint(fresh: Any, checkpoint: str, mode: InitMode,
               include: str) -> tuple[Any, list[str]]:
  """`init_params_from` with the parameters of `checkpoint` (a model
  directory, whose latest step is read, or one step's directory)."""
  return init_params_from(jax.tree.map(np.asarray, fresh),
                          checkpoints.restore_params(checkpoint), mode,
                          include)
