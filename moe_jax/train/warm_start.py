"""Warm start: a fresh run's parameters filled from another checkpoint
(`TrainConfig.init_checkpoint`) before its first step.

Only parameters are taken; the optimizer state and the step start anew.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any

import jax
import numpy as np

from moe_jax.models.config import TransformerConfig
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


class CheckpointFormat(str, enum.Enum):
  """What `TrainConfig.init_checkpoint` is.

  MOE_JAX: a moe_jax model directory or step directory.
  T5X: a T5X checkpoint (`checkpoint_<step>/` or its model directory) in
    flaxformer's names, read by `moe_jax.interop.t5x_checkpoint` for the
    run's model config (UPCYCLE: for its dense counterpart); every weight
    must map, with the config's shapes.
  """
  MOE_JAX = "moe_jax"
  T5X = "t5x"


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
                    include: str, config: TransformerConfig,
                    checkpoint_format: CheckpointFormat = (
                        CheckpointFormat.MOE_JAX)) -> tuple[Any, list[str]]:
  """`init_params_from` with the parameters of `checkpoint`.

  Args:
    fresh: the new model's initialized parameters; MATCHING leaves them
      where they are (only UPCYCLE copies them to host memory).
    checkpoint: a moe_jax model / step directory (its latest step), or a
      T5X checkpoint (`CheckpointFormat.T5X`).
    mode, include: as `init_params_from`.
    config: the new model's config (to map T5X names).
    checkpoint_format: `CheckpointFormat`.
  """
  if CheckpointFormat(checkpoint_format) == CheckpointFormat.T5X:
    # Imported here: the reader pulls in tensorstore.
    from moe_jax.interop import t5x_checkpoint
    source_config = (dataclasses.replace(config, encoder_moe=None,
                                         decoder_moe=None)
                     if InitMode(mode) == InitMode.UPCYCLE else config)
    source = t5x_checkpoint.import_t5x(checkpoint, source_config)
  else:
    source = checkpoints.restore_params(checkpoint)
  if InitMode(mode) == InitMode.UPCYCLE:
    fresh = jax.tree.map(np.asarray, fresh)
  return init_params_from(fresh, source, mode, include)
