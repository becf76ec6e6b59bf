"""DSelect-k (Hazimeh et al. 2021, "DSelect-k: Differentiable Selection in
the Mixture of Experts").

Dimension names: G groups, S tokens per group, D model width, E = 2^M
experts, K selectors.

Selector i holds M code logits z_i; with the smooth-step function
  s(t) = 0 for t <= -gamma/2, 1 for t >= gamma/2,
         -2/gamma^3 t^3 + 3/(2 gamma) t + 1/2 in between,
its distribution over experts is r_i(e) = prod_j (s(z_ij) if bit j of e
else 1 - s(z_ij)), which becomes exactly one-hot once every |z_ij| >=
gamma/2. The expert weights are q = sum_i softmax(w)_i r_i. The entropy
regularizer sum_i H(r_i) (mean over tokens, times `entropy_weight`) is the
router's auxiliary loss and pushes the selectors to one-hot codes.

Static: z and w are parameters shared by all tokens. Per-example: z = x W_z
and w = x W_w.

As a routing decision the K experts of largest q are dispatched with gate
q_e. After the codes converge q has at most K nonzero entries and this is
exact; before, weight on other experts is left out of the layer output
(router_probs keeps the full q for inspection).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.moe import routing

Array = jax.Array


def smooth_step(t: Array, gamma: float) -> Array:
  """Cubic smooth step: 0 below -gamma/2, 1 above gamma/2, C^1 in between."""
  cubic = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
  return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def selector_distributions(code_logits: Array, gamma: float) -> Array:
  """<float32>[..., K, E] r_i(e) from <float32>[..., K, M] code logits."""
  m = code_logits.shape[-1]
  bits = (np.arange(2**m)[:, None] >> np.arange(m)[None, :]) & 1  # [E, M]
  s = smooth_step(code_logits, gamma)[..., None, :]  # [..., K, 1, M]
  return jnp.prod(jnp.where(bits == 1, s, 1.0 - s), axis=-1)


def entropy(p: Array) -> Array:
  """Shannon entropy (nats) over the last axis, 0 log 0 = 0."""
  safe = jnp.where(p > 0, p, 1.0)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=-1)


class DSelectKRouter(routing.TokenChoiceRouterBase):
  """DSelect-k gate (static or per-example) as a K-way token choice.

  Attributes:
    num_selected_experts: K selectors.
    per_example: codes and selector weights computed from each token (True)
      or shared parameters (False, the paper's static gate).
    gamma: smooth-step width; codes start uniform in [-gamma/2, gamma/2].
    entropy_weight: scale of the entropy regularizer in the aux loss.
  """
  num_selected_experts: int = 2
  per_example: bool = True
  gamma: float = 1.0
  entropy_weight: float = 1e-3

  @property
  def experts_per_token(self) -> int:
    return self.num_selected_experts

  def validate(self, num_experts: int) -> None:
    super().validate(num_experts)
    if num_experts < 2 or num_experts & (num_experts - 1):
      raise ValueError("DSelect-k needs num_experts a power of two >= 2; got "
                       f"num_experts={num_experts}")
    routing.check_num_selected_experts(self.num_selected_experts, num_experts)
    if self.gamma <= 0:
      raise ValueError(f"gamma must be > 0; got gamma={self.gamma}")
    if self.entropy_weight < 0:
      raise ValueError(
          f"entropy_weight must be >= 0; got entropy_weight={self.entropy_weight}")

  def select(self, x: Array, token_mask: Array, *, num_experts: int,
             deterministic: bool, token_ids: Optional[Array]
             ) -> routing.Selection:
    del deterministic, token_ids
    k, m = self.num_selected_experts, int(np.log2(num_experts))
    code_init = nn.initializers.uniform(self.gamma)
    shifted = lambda key, shape, dtype: code_init(key, shape, dtype) - (
        self.gamma / 2)
    if self.per_example:
      codes = routing.RouterWeights(k * m, name="code_weights")(x)
      codes = codes.reshape(x.shape[:2] + (k, m))
      selector_logits = routing.RouterWeights(k, name="selector_weights")(x)
    else:
      codes = jnp.broadcast_to(self.param("codes", shifted, (k, m),
                                          jnp.float32), x.shape[:2] + (k, m))
      selector_logits = jnp.broadcast_to(
          self.param("selector_logits", nn.initializers.zeros_init(), (k,),
                     jnp.float32), x.shape[:2] + (k,))
    r = selector_distributions(codes, self.gamma)  # [G, S, K, E]
    alpha = jax.nn.softmax(selector_logits, axis=-1)
    q = jnp.einsum("gsk,gske->gse", alpha, r)

    mask = token_mask
    aux = self.entropy_weight * jnp.sum(
        jnp.sum(entropy(r), -1) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    gates, expert_index = jax.lax.top_k(q, k)
    wanted = jnp.broadcast_to(mask[..., None] > 0, expert_index.shape)
    return routing.Selection(expert_index, gates, wanted & (gates > 0), q,
                             auxiliary_loss=aux)
