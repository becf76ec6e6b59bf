"""Per-token view of a routing decision, for inspection.

Dimension names: G groups, S tokens per group, E experts, K choices per
token, C expert capacity.

Both decision types become the same dense `[G, S, E]` picture: which expert
processed which token, with which combine weight. The MoE layer sows it into
the `metric_names.ROUTING` collection only when that collection is mutable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.routing import ExpertChoice, RoutingDecision, TokenChoice

Array = jax.Array


def token_expert_assignment(decision: RoutingDecision, num_experts: int,
                            group_size: int) -> tuple[Array, Array]:
  """Dense (token, expert) assignment of a routing decision.

  Args:
    decision: a `TokenChoice` ([G, S, K]) or `ExpertChoice` ([G, E, C]).
    num_experts: E.
    group_size: S.

  Returns:
    dispatch_mask <bool>[G, S, E]: the expert processed the token;
    combine_weights <float32>[G, S, E]: its weight in the token's output (0
    where not dispatched).
  """
  if isinstance(decision, TokenChoice):
    one_hot = jax.nn.one_hot(decision.expert_index, num_experts,
                             dtype=jnp.float32)  # [G, S, K, E]
    taken = one_hot * decision.dispatched[..., None]
    mask = jnp.sum(taken, axis=2) > 0
    weights = jnp.sum(taken * decision.gates[..., None], axis=2)
    return mask, weights
  if isinstance(decision, ExpertChoice):
    one_hot = jax.nn.one_hot(decision.token_index, group_size,
                             dtype=jnp.float32)  # [G, E, C, S]
    taken = one_hot * decision.dispatched[..., None]
    mask = jnp.swapaxes(jnp.sum(taken, axis=2), 1, 2) > 0
    weights = jnp.swapaxes(
        jnp.sum(taken * decision.gates[..., None], axis=2), 1, 2)
    return mask, weights
  raise TypeError(f"unknown routing decision {type(decision).__name__}")
