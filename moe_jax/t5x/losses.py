"""MoE loss terms and `experts/...` metrics read from `intermediates`.

Needs no t5x: `moe_jax.t5x.models` adds these terms to T5X's loss, and the
tests check them against the `MoeStats` a model returns.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp

from moe_jax.moe import metric_names

Array = jax.Array

METRIC_PREFIX = "experts/"


def sown_means(intermediates: Mapping[str, Any]) -> dict[str, Array]:
  """Mean over every sparse layer of each scalar metric in `intermediates`.

  Args:
    intermediates: the `intermediates` collection of a forward pass. Each
      MoE layer sows a tuple of values per name; a scanned stack sows them
      with a leading [layers] axis.

  Returns:
    {metric name: float32 scalar} for the names in
    `metric_names.SCALAR_METRICS` that were sown; empty for a dense model.
  """
  values: dict[str, list[Array]] = {}
  for path, leaf in traverse_util.flatten_dict(dict(intermediates)).items():
    name = path[-1]
    if name in metric_names.SCALAR_METRICS:
      for value in (leaf if isinstance(leaf, tuple) else (leaf,)):
        values.setdefault(name, []).append(
            jnp.ravel(jnp.asarray(value, jnp.float32)))
  return {name: jnp.mean(jnp.concatenate(parts))
          for name, parts in values.items()}


def moe_loss_and_metrics(intermediates: Mapping[str, Any],
                         aux_loss_factor: float,
                         router_z_loss_factor: float
                         ) -> tuple[Array, dict[str, Array]]:
  """The MoE term added to the task loss, and its metrics.

  Returns:
    (aux_loss_factor * mean auxiliary loss + router_z_loss_factor * mean
    router z-loss, {"experts/<name>": mean over sparse layers}). Zero and
    no metrics for a dense model.
  """
  means = sown_means(intermediates)
  extra = jnp.zeros((), jnp.float32)
  if metric_names.AUXILIARY_LOSS in means:
    extra += aux_loss_factor * means[metric_names.AUXILIARY_LOSS]
  if metric_names.ROUTER_Z_LOSS in means:
    extra += router_z_loss_factor * means[metric_names.ROUTER_Z_LOSS]
  metrics = {METRIC_PREFIX + name: value for name, value in means.items()}
  return extra, metrics
