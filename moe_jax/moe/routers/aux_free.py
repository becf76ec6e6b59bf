"""Auxiliary-loss-free balancing (DeepSeek-V3, Liu et al. 2024; Wang et al.
2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts").

Dimension names: G groups, S tokens per group, E experts, K experts selected
per token.

Top-K token choice where each expert e has a bias b_e that is added to the
router probabilities only to choose the K experts; the gates stay the
unbiased probabilities. The bias is no parameter and gets no gradient: after
each training call it moves against the expert's load,

  b_e <- b_e + rate * sign(mean_e' load_e' - load_e),

load_e the (token, expert) choices of that call that went to e (before
capacity, so an overloaded expert counts all it was asked for). It lives in
the `router_state` variable collection (`ROUTER_STATE`); a training call
that makes the collection mutable gets the updated bias back, one that
does not (or an evaluation call) leaves it unchanged. Use it with the
balancing loss off: `gin/routing/aux_free.gin` sets AUX_LOSS_FACTOR = 0.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.moe.metric_names import ROUTER_STATE
from moe_jax.moe.routers.token_choice import TokenChoiceRouter
from moe_jax.moe.routing import Selection

Array = jax.Array

SELECTION_BIAS = "selection_bias"


def update_selection_bias(bias: Array, load: Array, rate: float) -> Array:
  """b + rate * sign(mean(load) - load): <float32>[E] from <[E]> load."""
  load = load.astype(jnp.float32)
  return bias + rate * jnp.sign(jnp.mean(load) - load)


def choices_per_expert(selection: Selection, num_experts: int) -> Array:
  """<float32>[E] wanted (token, expert) choices of `selection` per expert,
  summed over groups, before capacity."""
  one_hot = jax.nn.one_hot(selection.expert_index, num_experts,
                           dtype=jnp.float32)
  return jnp.sum(one_hot * selection.wanted[..., None], axis=(0, 1, 2))


class AuxLossFreeRouter(TokenChoiceRouter):
  """Top-K token choice balanced by a per-expert selection bias.

  Every knob of `TokenChoiceRouter` applies (K, renormalize_gates, ...).

  Attributes:
    bias_update_rate: step of the sign update per training call (DeepSeek-V3
      uses 1e-3); in units of router probability.
  """
  bias_update_rate: float = 1e-3

  def validate(self, num_experts: int) -> None:
    super().validate(num_experts)
    if self.bias_update_rate < 0:
      raise ValueError("bias_update_rate must be >= 0; got "
                       f"bias_update_rate={self.bias_update_rate}")

  def selection_bias(self, num_experts: int) -> Array:
    if not (self.has_variable(ROUTER_STATE, SELECTION_BIAS) or
            self.is_mutable_collection(ROUTER_STATE)):
      raise ValueError(
          f"{type(self).__name__} keeps its per-expert selection bias in the "
          f"'{ROUTER_STATE}' variable collection; pass it with the params "
          f"(variables={{'params': ..., '{ROUTER_STATE}': ...}}, from init)")
    return self.variable(ROUTER_STATE, SELECTION_BIAS, jnp.zeros,
                         (num_experts,), jnp.float32).value

  def select(self, x: Array, token_mask: Array, *, num_experts: int,
             deterministic: bool, token_ids: Optional[Array]) -> Selection:
    selection = super().select(x, token_mask, num_experts=num_experts,
                               deterministic=deterministic,
                               token_ids=token_ids)
    if (not deterministic and not self.is_initializing() and
        self.is_mutable_collection(ROUTER_STATE)):
      self.put_variable(ROUTER_STATE, SELECTION_BIAS, update_selection_bias(
          self.get_variable(ROUTER_STATE, SELECTION_BIAS),
          choices_per_expert(selection, num_experts), self.bias_update_rate))
    return selection
