"""Routing auxiliary losses.

Dimension names used throughout: G groups, S tokens per group, E experts,
K experts selected per token.

Every loss takes an explicit `token_mask` `<float32>[G, S]` (1 for real tokens,
0 for padding) so padding never counts towards balance or z-loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _masked_mean(values: Array, token_mask: Array, axis) -> Array:
  """Mean of `values` over `axis`, counting only tokens with token_mask = 1."""
  total = jnp.sum(values * token_mask, axis=axis)
  count = jnp.maximum(jnp.sum(token_mask, axis=axis), 1.0)
  return total / count


def load_balancing_loss(router_probs: Array, expert_mask: Array,
                        token_mask: Array) -> Array:
  """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4).

  loss = E * sum_e f_e * P_e, averaged over groups, where f_e is the fraction
  of tokens that selected expert e (any of their K choices, before capacity
  drops) and P_e is the mean router probability of expert e.

  Minimum: with uniform routing (f_e = K / E and P_e = 1 / E) the loss equals
  K exactly, i.e. 1.0 for top-1 routing. It rises as routing concentrates.

  Args:
    router_probs: <float32>[G, S, E] softmax router probabilities.
    expert_mask: <float32>[G, S, E] 1 where the token selected the expert.
    token_mask: <float32>[G, S] 1 for real tokens.

  Returns:
    Scalar loss.
  """
  num_experts = router_probs.shape[-1]
  mask = token_mask[..., None]
  fraction_routed = _masked_mean(expert_mask, mask, axis=1)  # [G, E]
  mean_prob = _masked_mean(router_probs, mask, axis=1)  # [G, E]
  per_group = num_experts * jnp.sum(fraction_routed * mean_prob, axis=-1)
  return jnp.mean(per_group)


def router_z_loss(router_logits: Array, token_mask: Array) -> Array:
  """ST-MoE router z-loss (Zoph et al. 2022, eq. 5).

  loss = mean over real tokens of (log sum_e exp(logit_e))^2. It keeps router
  logits small, which keeps the float32 softmax well conditioned.

  Args:
    router_logits: <float32>[G, S, E].
    token_mask: <float32>[G, S].

  Returns:
    Scalar loss.
  """
  log_z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
  return _masked_mean(jnp.square(log_z), token_mask, axis=(0, 1))


def coefficient_of_variation_squared(values: Array, axis: int = -1) -> Array:
  """CV(x)^2 = Var(x) / Mean(x)^2 along `axis` (Shazeer et al. 2017)."""
  mean = jnp.mean(values, axis=axis)
  var = jnp.var(values, axis=axis)
  return var / (jnp.square(mean) + 1e-10)


def importance_loss(gates: Array, token_mask: Array) -> Array:
  """Importance loss CV(sum over tokens of gates)^2 (Shazeer et al. 2017).

  Args:
    gates: <float32>[G, S, E] combine weights per token and expert.
    token_mask: <float32>[G, S].
  """
  importance = jnp.sum(gates * token_mask[..., None], axis=(0, 1))  # [E]
  return coefficient_of_variation_squared(importance)
