"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks").

Dimension names: G groups, S tokens per group, D model width, E experts,
K experts selected per token.

H(x) = x W_g + N(0, 1) * softplus(x W_noise); the top-K entries of H are kept
and a softmax over them gives the gates (other experts get exactly 0). The
balancing loss is importance + load:

* importance: CV(sum over tokens of the gates)^2;
* load: CV(sum over tokens of P(x, i))^2, P(x, i) the probability, over a
  fresh draw of expert i's noise only, that H_i stays in the top K; with the
  others' values fixed it is Phi((x W_g)_i - kth_excluding(H, i)) / sigma_i),
  Phi the standard normal CDF and sigma_i = softplus(x W_noise)_i. The
  threshold is the K-th largest of H if i is outside the top K and the
  (K+1)-th otherwise (paper eq. 9). Unlike the discrete expert counts this is
  differentiable in W_g and W_noise.

W_g and W_noise start at zero, as in the paper, so training starts with
uniform gates and equal noise on every expert. Without noise (at eval) the
load loss falls back to the top-K indicator, i.e. the discrete load.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from moe_jax.moe import losses
from moe_jax.moe import routing

Array = jax.Array


def smooth_load(clean_logits: Array, noisy_logits: Array, noise_std: Array,
                token_mask: Array, k: int) -> Array:
  """<float32>[E] sum over real tokens of P(x, i) (Shazeer et al. eq. 8-9).

  Args:
    clean_logits: <float32>[G, S, E] x W_g.
    noisy_logits: <float32>[G, S, E] H(x).
    noise_std: <float32>[G, S, E] softplus(x W_noise), > 0.
    token_mask: <float32>[G, S].
    k: K, must be < E.
  """
  top, _ = jax.lax.top_k(noisy_logits, k + 1)  # [G, S, K+1]
  kth, kth_plus_one = top[..., k - 1:k], top[..., k:k + 1]
  in_top_k = noisy_logits >= kth
  threshold = jnp.where(in_top_k, kth_plus_one, kth)
  prob = norm.cdf((clean_logits - threshold) / noise_std)
  return jnp.sum(prob * token_mask[..., None], axis=(0, 1))


class NoisyTopKRouter(routing.TokenChoiceRouterBase):
  """Noisy top-K token choice with importance and load losses.

  Attributes:
    num_selected_experts: K; must be < E so the load estimate has a
      (K+1)-th value to compare with.
    min_noise_std: added to softplus(x W_noise) so the CDF never divides by 0.
    batch_prioritized_routing: place tokens in order of their top gate.
  """
  num_selected_experts: int = 2
  min_noise_std: float = 1e-2
  batch_prioritized_routing: bool = False

  @property
  def experts_per_token(self) -> int:
    return self.num_selected_experts

  def validate(self, num_experts: int) -> None:
    super().validate(num_experts)
    routing.check_num_selected_experts(self.num_selected_experts, num_experts,
                                       most=num_experts - 1)
    if self.min_noise_std <= 0:
      raise ValueError(
          f"min_noise_std must be > 0; got min_noise_std={self.min_noise_std}")

  def select(self, x: Array, token_mask: Array, *, num_experts: int,
             deterministic: bool, token_ids: Optional[Array]
             ) -> routing.Selection:
    del token_ids
    zeros = nn.initializers.zeros_init()
    clean = routing.RouterWeights(num_experts, kernel_init=zeros,
                                  name="gate_weights")(x)
    noise_std = jax.nn.softplus(routing.RouterWeights(
        num_experts, kernel_init=zeros, name="noise_weights")(x))
    noise_std = noise_std + self.min_noise_std
    if deterministic:
      noisy = clean
    else:
      noisy = clean + noise_std * jax.random.normal(
          self.make_rng("dropout"), clean.shape, jnp.float32)

    k = self.num_selected_experts
    top_logits, expert_index = jax.lax.top_k(noisy, k)
    gates = jax.nn.softmax(top_logits, axis=-1)  # [G, S, K]
    dense_gates = jnp.sum(
        jax.nn.one_hot(expert_index, num_experts) * gates[..., None], axis=-2)

    importance = losses.importance_loss(dense_gates, token_mask)
    if deterministic:
      load = jnp.sum((dense_gates > 0) * token_mask[..., None], axis=(0, 1))
    else:
      load = smooth_load(clean, noisy, noise_std, token_mask, k)
    return routing.Selection(
        expert_index, gates,
        jnp.broadcast_to(token_mask[..., None] > 0, expert_index.shape),
        dense_gates,
        auxiliary_loss=importance + losses.coefficient_of_variation_squared(
            load),
        router_z_loss=losses.router_z_loss(noisy, token_mask),
        priority_order=(jnp.argsort(-gates[..., 0], axis=-1) if
                        self.batch_prioritized_routing else None))
