"""Top-K token choice: Switch top-1, GShard top-2, Mixtral renormalized top-2.

Dimension names: G groups, S tokens per group, D model width, E experts,
K experts selected per token, C expert capacity.
"""

from __future__ import annotations

import enum
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import knobs
from moe_jax.moe import losses
from moe_jax.moe.routing import (RouterWeights, Selection,
                                 TokenChoiceRouterBase,
                                 check_num_selected_experts)

Array = jax.Array


class SecondExpertPolicy(str, enum.Enum):
  """How token choice treats choices after the first (GShard, Lepikhin 2020).

  ALL: dispatch every choice that fits in capacity.
  RANDOM: in training, dispatch choice i > 0 with probability
    min(1, g_i / second_expert_threshold), g_i the choice's gate renormalized
    over the K choices; with the default threshold 0.5 this is GShard's
    "dispatch with probability 2 * g_2". At eval every choice is dispatched.
  """
  ALL = "all"
  RANDOM = "random"


class TokenChoiceRouter(TokenChoiceRouterBase):
  """Top-K token choice: Switch (K=1), GShard (K=2), Mixtral (renormalized).

  Attributes:
    num_selected_experts: K.
    batch_prioritized_routing: place tokens in order of their top router
      probability instead of group order, so confident tokens are dropped
      last (Riquelme et al. 2021, BPR).
    renormalize_gates: combine weights are the top-K probabilities divided by
      their sum (Mixtral, GShard) instead of the raw softmax probabilities
      (Switch, flaxformer's default).
    second_expert_policy: see `SecondExpertPolicy`.
    second_expert_threshold: threshold of the RANDOM policy.
  """
  num_selected_experts: int = 1
  batch_prioritized_routing: bool = False
  renormalize_gates: bool = False
  second_expert_policy: SecondExpertPolicy = SecondExpertPolicy.ALL
  second_expert_threshold: float = 0.5

  @property
  def experts_per_token(self) -> int:
    return self.num_selected_experts

  def validate(self, num_experts: int) -> None:
    super().validate(num_experts)
    check_num_selected_experts(self.num_selected_experts, num_experts)
    knobs.choice(SecondExpertPolicy, "second_expert_policy",
                 self.second_expert_policy)
    if self.second_expert_threshold <= 0:
      raise ValueError("second_expert_threshold must be > 0; got "
                       f"second_expert_threshold={self.second_expert_threshold}")

  def select(self, x: Array, token_mask: Array, *, num_experts: int,
             deterministic: bool, token_ids: Optional[Array]) -> Selection:
    del token_ids
    logits = RouterWeights(num_experts, name="router_weights")(x)
    probs = jax.nn.softmax(logits, axis=-1)
    bias = self.selection_bias(num_experts)
    if bias is None:
      top_probs, expert_index = jax.lax.top_k(probs,
                                              self.num_selected_experts)
    else:
      # The bias moves which experts are chosen, never the gates.
      _, expert_index = jax.lax.top_k(probs + bias, self.num_selected_experts)
      top_probs = jnp.take_along_axis(probs, expert_index, axis=-1)
    normalized = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    gates = normalized if self.renormalize_gates else top_probs

    wanted = jnp.broadcast_to(token_mask[..., None] > 0, expert_index.shape)
    if (SecondExpertPolicy(self.second_expert_policy) ==
        SecondExpertPolicy.RANDOM and not deterministic and
        self.num_selected_experts > 1):
      draw = jax.random.uniform(self.make_rng("dropout"), normalized.shape)
      keep = draw < normalized / self.second_expert_threshold
      wanted = wanted & keep.at[..., 0].set(True)

    expert_mask = jnp.sum(
        jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=-2)
    return Selection(
        expert_index, gates, wanted, probs,
        auxiliary_loss=losses.load_balancing_loss(probs, expert_mask,
                                                  token_mask),
        router_z_loss=losses.router_z_loss(logits, token_mask),
        priority_order=(jnp.argsort(-top_probs[..., 0], axis=-1) if
                        self.batch_prioritized_routing else None))

  def selection_bias(self, num_experts: int) -> Optional[Array]:
    """<float32>[E] added to the probabilities to choose the top K (not to
    the gates), or None: plain top-K. See `routers.aux_free`."""
    del num_experts
    return None
