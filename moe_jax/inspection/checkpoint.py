"""Open a model directory: its gin config, model, and restored parameters.

Only the parameters are read from the orbax checkpoint (`params` of the
saved `TrainState`); the optimizer state stays on disk.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from moe_jax import gin_utils
from moe_jax.models import (TransformerConfig, build_model,
                            configured_model_config, dummy_batch)
from moe_jax.param_paths import flat_params
from moe_jax.paths import as_path
from moe_jax.train import checkpoints
from moe_jax.train.step import model_variables


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """A restored model.

  Attributes:
    model_dir: the run's directory (None for parameters built in memory).
    step: the restored step.
    config: the model's `TransformerConfig` (from MODEL_DIR/config.gin).
    model: the flax module.
    params: restored parameters (nested dict of arrays).
    logical_axes: same tree as `params`, each leaf a tuple of logical axis
      names (e.g. ('expert', 'embed', 'expert_mlp')).
    model_state: the saved non-gradient model state
      (`TrainState.model_state`, e.g. the aux-loss-free selection bias).
  """
  model_dir: Optional[epath.Path]
  step: int
  config: TransformerConfig
  model: nn.Module
  params: Any
  logical_axes: Any
  model_state: Any = dataclasses.field(default_factory=dict)

  def variables(self) -> dict[str, Any]:
    """What to apply `model` with: the parameters and the model state."""
    return model_variables(self.params, self.model_state)


@dataclasses.dataclass(frozen=True)
class ParamRecord:
  """One parameter: '/'-joined path, shape, dtype, logical axes, the
  sharding of the restored array, and its number of elements."""
  path: str
  shape: tuple[int, ...]
  dtype: str
  logical_axes: tuple[Optional[str], ...]
  sharding: str
  size: int


def _logical_axes(boxed_params: Any) -> Any:
  is_boxed = lambda x: isinstance(x, nn.Partitioned)
  return jax.tree.map(
      lambda x: tuple(x.names) if is_boxed(x) else (None,) * len(x.shape),
      boxed_params, is_leaf=is_boxed)


def open_checkpoint(model_dir: str | epath.PathLike, step: Optional[int] = None
                    ) -> Checkpoint:
  """Restores the parameters saved at `step` (default: the latest) onto
  the first device.

  Parses MODEL_DIR/config.gin, which replaces the process's current gin
  configuration.

  Raises:
    ValueError: no config.gin, no checkpoint, or `step` not saved.
  """
  model_dir = as_path(model_dir)
  config_path = model_dir / checkpoints.CONFIG_FILE
  if not config_path.is_file():
    raise ValueError(f"{model_dir} has no {checkpoints.CONFIG_FILE}; is it a "
                     "moe_jax model directory?")
  step = checkpoints.resolve_step(model_dir, step)
  gin_utils.parse([str(config_path)])
  config = configured_model_config()
  model = build_model(config)
  boxed = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), **dummy_batch(config, 1, 4, 4),
                         enable_dropout=False))["params"]
  params = checkpoints.restore_params(model_dir, step,
                                      abstract_params=nn.unbox(boxed))
  return Checkpoint(model_dir, step, config, model, params,
                    _logical_axes(boxed),
                    checkpoints.restore_model_state(model_dir, step))


def param_records(checkpoint: Checkpoint) -> list[ParamRecord]:
  """Every parameter of `checkpoint`, in path order."""
  flat = flat_params(checkpoint.params)
  axes = flat_params(checkpoint.logical_axes,
                     is_leaf=lambda x: isinstance(x, tuple))
  return [ParamRecord(path, tuple(value.shape), str(value.dtype), axes[path],
                      str(getattr(value, "sharding", "host")),
                      math.prod(value.shape))
          for path, value in sorted(flat.items())]


def format_param_table(records: list[ParamRecord]) -> str:
  """A fixed-width text table of `records` with a total line."""
  rows = [("path", "shape", "dtype", "logical axes", "sharding", "size")]
  for r in records:
    rows.append((r.path, "x".join(map(str, r.shape)) or "()", r.dtype,
                 ",".join(str(a) for a in r.logical_axes), r.sharding,
                 f"{r.size:,}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  total = int(np.sum([r.size for r in records]))
  lines.append(f"{len(records)} parameters, {total:,} elements")
  return "\n".join(lines)
