"""Expert choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

Dimension names: G groups, S tokens per group, D model width, E experts,
C expert capacity.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.moe import losses
from moe_jax.moe.routing import (ExpertChoice, RouterOutput, Router,
                                 RouterWeights)

Array = jax.Array


class ExpertChoiceRouter(Router):
  """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens.

  Token-to-expert probabilities are a softmax over experts; expert e takes the
  C tokens of the group with the highest probability for e and weights its
  output by that probability. Every expert is exactly full, so there is no
  balancing loss; a token may be taken by several experts or by none.

  An expert's choice depends on every token of the group, later ones
  included: in a causal decoder this leaks the future, and the MoE layer
  refuses it unless told otherwise.
  """

  @property
  def supports_dropless(self) -> bool:
    return False

  @property
  def sees_whole_group(self) -> bool:
    return True

  def mean_experts_per_token(self, capacity_factor: float,
                             num_experts: int) -> float:
    # Each expert takes C = capacity_factor * S / E tokens (at most S).
    return min(capacity_factor, num_experts)

  @nn.compact
  def __call__(self, x: Array, token_mask: Array, *, num_experts: int,
               capacity: Optional[int], deterministic: bool,
               token_ids: Optional[Array] = None) -> RouterOutput:
    del token_ids
    if capacity is None:
      raise ValueError("ExpertChoiceRouter needs a capacity; it cannot run on "
                       "the dropless dispatch path")
    logits = RouterWeights(num_experts, name="router_weights")(
        self.jitter(x, deterministic))
    probs = jax.nn.softmax(logits, axis=-1)
    # Padding tokens score below every real token, so they are taken last.
    scores = jnp.where(token_mask[..., None] > 0, probs, -1.0)
    _, token_index = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)
    chosen_prob = jnp.take_along_axis(jnp.swapaxes(probs, 1, 2), token_index,
                                      axis=-1)  # [G, E, C]
    dispatched = jnp.take_along_axis(
        jnp.broadcast_to(token_mask[:, None, :] > 0, scores.shape[:1] +
                         (num_experts, scores.shape[1])), token_index, axis=-1)
    decision = ExpertChoice(
        token_index=token_index.astype(jnp.int32),
        gates=jnp.where(dispatched, chosen_prob, 0.0),
        dispatched=dispatched)
    z_loss = losses.router_z_loss(logits, token_mask)
    return RouterOutput(decision, probs, jnp.zeros((), jnp.float32), z_loss)
