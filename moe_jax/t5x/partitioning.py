"""Logical axis rules for T5X's `PjitPartitioner`.

T5X's mesh has two axes, ("data", "model"). moe_jax's rules target
("data", "expert", "model"); on T5X's mesh the experts are sharded over
`data` (as T5X's MoE models do): expert parallelism then spans the data
axis, and tokens reach their experts through XLA's all-to-all.
"""

from __future__ import annotations

from moe_jax.partitioning import LogicalRules, logical_axis_rules

T5X_MESH_AXES = ("data", "model")


def _to_t5x_axis(axis):
  if axis is None:
    return None
  if isinstance(axis, tuple):
    mapped = tuple(dict.fromkeys("data" if a == "expert" else a for a in axis))
    return mapped[0] if len(mapped) == 1 else mapped
  return "data" if axis == "expert" else axis


def t5x_logical_axis_rules(fsdp: bool = False) -> LogicalRules:
  """moe_jax's logical rules with the `expert` mesh axis folded into `data`.

  Bind as `PjitPartitioner.logical_axis_rules = @t5x_logical_axis_rules()`.
  Every target is a T5X mesh axis; no mesh axis is used twice in one rule.
  """
  return tuple((name, _to_t5x_axis(axis))
               for name, axis in logical_axis_rules(fsdp=fsdp))
