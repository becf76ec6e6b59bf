"""moe_jax's initial variables in T5X's layout (flaxformer's convention).

moe_jax declares every parameter with `nn.with_logical_partitioning`, so
`module.init` returns `nn.LogicallyPartitioned` boxes. T5X's train state,
Adafactor and partitioner instead read raw arrays under `params` and the
logical axis names from a `params_axes` collection that mirrors `params`,
holding `flax.linen.partitioning.AxisMetadata` under `<name>_axes`. Needs no
t5x.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
from flax import traverse_util
from flax.core import meta
from flax.linen import partitioning as flax_partitioning

from moe_jax.moe import metric_names

# Collections an init may sow that are per-batch outputs, not state.
SOWN = (metric_names.INTERMEDIATES, metric_names.ROUTING)


def t5x_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """Unboxed `params`, their `params_axes`, and the other state collections.

  Args:
    variables: what `module.init` returned (boxed params).

  Returns:
    {"params": raw arrays, "params_axes": {..., "<name>_axes":
    AxisMetadata(names)}, every other collection but the sown ones}.

  Raises:
    ValueError: a parameter carries no logical axis names (its path).
  """
  flat = traverse_util.flatten_dict(dict(variables["params"]))
  params, axes = {}, {}
  for path, leaf in flat.items():
    if not isinstance(leaf, nn.LogicallyPartitioned):
      raise ValueError(
          f"parameter {'/'.join(path)} has no logical axis names: declare "
          "it with nn.with_logical_partitioning (T5X needs params_axes)")
    params[path] = leaf.value
    axes[path[:-1] + (path[-1] + "_axes",)] = (
        flax_partitioning.AxisMetadata(names=tuple(leaf.names)))
  others = {name: meta.unbox(value) for name, value in variables.items()
            if name not in ("params",) + SOWN}
  return {"params": traverse_util.unflatten_dict(params),
          "params_axes": traverse_util.unflatten_dict(axes), **others}
