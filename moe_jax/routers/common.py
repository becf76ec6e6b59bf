"""Helpers shared by the literature routers."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import routing

Array = jax.Array


def token_choice_with_capacity(expert_index: Array, gates: Array,
                               wanted: Array, capacity: Optional[int],
                               num_experts: int,
                               priority_order: Optional[Array] = None
                               ) -> routing.TokenChoice:
  """Applies expert capacity to K choices per token.

  Args:
    expert_index: <int32>[G, S, K] chosen experts.
    gates: <float32>[G, S, K] combine weight of each choice.
    wanted: <bool>[G, S, K] choices that compete for slots (real tokens).
    capacity: C, or None on the dropless path.
    num_experts: E.
    priority_order: <int32>[G, S] tokens in placement order, or None for
      group order.

  Returns:
    A `TokenChoice` whose choices past capacity are dropped.
  """
  if capacity is None:
    position, dispatched = None, wanted
  else:
    position = routing.positions_in_experts(expert_index, wanted,
                                            priority_order, num_experts)
    dispatched = wanted & (position < capacity)
    position = jnp.where(dispatched, position, capacity).astype(jnp.int32)
  return routing.TokenChoice(
      expert_index=expert_index.astype(jnp.int32),
      gates=jnp.where(dispatched, gates, 0.0),
      dispatched=dispatched,
      position=position)
