"""Routing decisions and the base of every router.

A router maps token representations to a routing decision plus routing
losses; the routers themselves live in `moe_jax.moe.routers`.

Dimension names: G groups, S tokens per group, D model width, E experts,
K experts selected per token, C expert capacity (slots per expert per group).

A router returns a `RouterOutput` whose `decision` is one of two typed
results, and the MoE layer dispatches on that type:

* `TokenChoice`: each token picks K experts (Switch top-1, GShard top-2,
  Mixtral renormalized top-2). Indexed by token: `[G, S, K]`.
* `ExpertChoice`: each expert picks C tokens (Zhou et al. 2022). Indexed by
  expert slot: `[G, E, C]`.

Router math runs in float32 whatever the activation dtype: the softmax over
experts is numerically fragile in bfloat16 and small logit errors flip the
top-k choice (Switch Transformer, "selective precision", Fedus et al. 2021).

All randomness (jitter noise, GShard's random second expert) draws from the
'dropout' RNG stream and only when `deterministic=False`, so trainers that
pass a single dropout RNG (as T5X does) drive every stochastic part.
"""

from __future__ import annotations

from typing import Optional, Union

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from moe_jax import axes

Array = jax.Array


@struct.dataclass
class TokenChoice:
  """Each token's K expert choices, after capacity.

  Attributes:
    expert_index: <int32>[G, S, K] chosen experts, first choice first.
    gates: <float32>[G, S, K] combine weight of each choice; 0 where the
      choice is not dispatched.
    dispatched: <bool>[G, S, K] the choice is processed by its expert. False
      for padding tokens, choices over capacity (dropped) and second choices
      skipped by the random policy.
    position: <int32>[G, S, K] slot of the choice in its expert's buffer, in
      [0, C) where dispatched and equal to C otherwise; None on the dropless
      path, which has no buffers.
  """
  expert_index: Array
  gates: Array
  dispatched: Array
  position: Optional[Array] = None

  def tokens_dispatched(self) -> Array:
    """<int32>[G, S] number of experts that process each token."""
    return jnp.sum(self.dispatched, axis=-1, dtype=jnp.int32)

  def total_gate(self) -> Array:
    """<float32>[G, S] sum of each token's combine weights."""
    return jnp.sum(self.gates, axis=-1)

  def expert_load(self, num_experts: int) -> Array:
    """<float32>[E] dispatched tokens per expert, summed over groups."""
    one_hot = jax.nn.one_hot(self.expert_index, num_experts, dtype=jnp.float32)
    return jnp.sum(one_hot * self.dispatched[..., None], axis=(0, 1, 2))


@struct.dataclass
class ExpertChoice:
  """Each expert's C chosen tokens.

  Attributes:
    token_index: <int32>[G, E, C] chosen token (position in the group).
    gates: <float32>[G, E, C] combine weight; 0 where not dispatched.
    dispatched: <bool>[G, E, C] the slot holds a real (non-padding) token.
  """
  token_index: Array
  gates: Array
  dispatched: Array

  def _per_token(self, values: Array, group_size: int) -> Array:
    groups = self.token_index.shape[0]
    flat_index = self.token_index.reshape(groups, -1)
    out = jnp.zeros((groups, group_size), values.dtype)
    return jax.vmap(lambda o, i, v: o.at[i].add(v))(
        out, flat_index, values.reshape(groups, -1))

  def tokens_dispatched(self, group_size: int) -> Array:
    """<int32>[G, S] number of experts that took each token."""
    return self._per_token(self.dispatched.astype(jnp.int32), group_size)

  def total_gate(self, group_size: int) -> Array:
    """<float32>[G, S] sum of each token's combine weights."""
    return self._per_token(self.gates, group_size)

  def expert_load(self, num_experts: int) -> Array:
    """<float32>[E] dispatched tokens per expert, summed over groups."""
    del num_experts
    return jnp.sum(self.dispatched, axis=(0, 2)).astype(jnp.float32)


RoutingDecision = Union[TokenChoice, ExpertChoice]


@struct.dataclass
class RouterOutput:
  """What a router hands to the MoE layer.

  Attributes:
    decision: which (token, expert, slot) triples are processed, with weights.
    router_probs: <float32>[G, S, E] router probabilities (for inspection).
    auxiliary_loss: scalar balancing loss of this router (0 if it has none).
    router_z_loss: scalar ST-MoE z-loss of the router logits.
  """
  decision: RoutingDecision
  router_probs: Array
  auxiliary_loss: Array
  router_z_loss: Array


class RouterWeights(nn.Module):
  """Linear map from tokens to expert logits, in float32.

  Attributes:
    num_experts: E.
    kernel_init: initializer of the <float32>[D, E] kernel. Small by default
      so training starts near uniform routing.
  """
  num_experts: int
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
      0.1, "fan_in", "truncated_normal")

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """<float32>[G, S, D] -> <float32>[G, S, E] logits."""
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init,
                                               axes.ROUTER_KERNEL),
        (x.shape[-1], self.num_experts), jnp.float32)
    return jnp.einsum("gsd,de->gse", x, kernel,
                      precision=jax.lax.Precision.HIGHEST)


class Router(nn.Module):
  """Base of all routers.

  Subclasses implement `__call__(x, token_mask, *, num_experts, capacity,
  deterministic, token_ids=None) -> RouterOutput` with
    x: <any float>[G, S, D] tokens,
    token_mask: <float32>[G, S] 1 for real tokens, 0 for padding,
    capacity: C, or None on the dropless path (no token dropped),
    token_ids: <int32>[G, S] vocabulary ids, for routers that use them.
  Token-choice routers subclass `TokenChoiceRouterBase` instead and write
  only their selection rule.

  Attributes:
    jitter_noise: multiplicative noise eps: in training the router input is
      scaled by Uniform(1 - eps, 1 + eps) elementwise (Switch Transformer).
  """
  jitter_noise: float = 0.0

  @property
  def experts_per_token(self) -> int:
    """k of the capacity formula C = k * capacity_factor * S / E: the
    choices each token makes (1 for expert choice, whose C the capacity
    factor sets alone)."""
    return 1

  def mean_experts_per_token(self, capacity_factor: float,
                             num_experts: int) -> float:
    """Experts that process a token on average, ignoring drops (the expert
    FLOPs of `moe_jax.flops`): its `experts_per_token` choices."""
    del capacity_factor, num_experts
    return self.experts_per_token

  @property
  def supports_dropless(self) -> bool:
    return True

  @property
  def sees_whole_group(self) -> bool:
    """True if one token's routing depends on later tokens of the group."""
    return False

  def validate(self, num_experts: int) -> None:
    """Raises ValueError when this router cannot serve `num_experts`."""
    if self.jitter_noise < 0 or self.jitter_noise >= 1:
      raise ValueError(
          f"jitter_noise must be in [0, 1); got jitter_noise={self.jitter_noise}")

  def jitter(self, x: Array, deterministic: bool) -> Array:
    """Casts to float32 and applies multiplicative jitter in training."""
    x = x.astype(jnp.float32)
    if deterministic or self.jitter_noise == 0:
      return x
    noise = jax.random.uniform(
        self.make_rng("dropout"), x.shape, jnp.float32,
        minval=1.0 - self.jitter_noise, maxval=1.0 + self.jitter_noise)
    return x * noise


def check_num_selected_experts(k: int, num_experts: int,
                               most: Optional[int] = None) -> None:
  """Raises ValueError unless 1 <= k <= most (default: num_experts)."""
  most = num_experts if most is None else most
  if not 1 <= k <= most:
    bound = ("num_experts" if most == num_experts else
             f"{most} = num_experts - {num_experts - most}")
    raise ValueError(f"num_selected_experts must be in [1, {bound}] for "
                     f"num_experts={num_experts}; got num_selected_experts={k}")


@struct.dataclass
class Selection:
  """A token-choice router's K choices per token, before expert capacity.

  Attributes:
    expert_index: <int32>[G, S, K] chosen experts, first choice first.
    gates: <float32>[G, S, K] combine weight of each choice.
    wanted: <bool>[G, S, K] choices that compete for slots: real tokens,
      less any choice the router skips (e.g. GShard's random second expert).
    router_probs: <float32>[G, S, E] router probabilities (for inspection).
    auxiliary_loss: scalar balancing loss; 0.0 for routers without one.
    router_z_loss: scalar z-loss of the router logits; 0.0 without logits.
    priority_order: <int32>[G, S] tokens in slot placement order, or None
      for group order.
  """
  expert_index: Array
  gates: Array
  wanted: Array
  router_probs: Array
  auxiliary_loss: Array = 0.0
  router_z_loss: Array = 0.0
  priority_order: Optional[Array] = None


class TokenChoiceRouterBase(Router):
  """Base of routers where each token chooses its experts.

  `__call__` jitters the input (float32), asks the subclass's `select` for
  each token's choices, applies expert capacity (`token_choice_with_capacity`)
  and returns the `RouterOutput`; a subclass writes only `select`.
  """

  def select(self, x: Array, token_mask: Array, *, num_experts: int,
             deterministic: bool, token_ids: Optional[Array]) -> Selection:
    """The choices of each token.

    Args:
      x: <float32>[G, S, D] jittered tokens.
      token_mask: <float32>[G, S] 1 for real tokens, 0 for padding.
      num_experts: E.
      deterministic: evaluation mode (no randomness).
      token_ids: <int32>[G, S] vocabulary ids, or None.
    """
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: Array, token_mask: Array, *, num_experts: int,
               capacity: Optional[int], deterministic: bool,
               token_ids: Optional[Array] = None) -> RouterOutput:
    chosen = self.select(self.jitter(x, deterministic), token_mask,
                         num_experts=num_experts, deterministic=deterministic,
                         token_ids=token_ids)
    decision = token_choice_with_capacity(
        chosen.expert_index, chosen.gates, chosen.wanted, capacity,
        num_experts, chosen.priority_order)
    scalar = lambda loss: jnp.asarray(loss, jnp.float32)
    return RouterOutput(decision, chosen.router_probs,
                        scalar(chosen.auxiliary_loss),
                        scalar(chosen.router_z_loss))


def positions_in_experts(expert_index: Array, wanted: Array,
                         priority_order: Optional[Array],
                         num_experts: int) -> Array:
  """Slot of each choice in its expert's buffer, in priority order.

  Every token's first choice is placed before any token's second choice
  (k-major order); within one k, tokens go in `priority_order` (or in group
  order when None).

  Args:
    expert_index: <int32>[G, S, K].
    wanted: <bool>[G, S, K] choices that compete for slots.
    priority_order: <int32>[G, S] permutation of tokens, highest priority
      first, or None.
    num_experts: E.

  Returns:
    <int32>[G, S, K] zero-based arrival order of each wanted choice at its
    expert (garbage where not wanted).
  """
  if priority_order is not None:
    take = lambda a: jnp.take_along_axis(a, priority_order[..., None], axis=1)
    expert_index, wanted = take(expert_index), take(wanted)
  groups, tokens, k = expert_index.shape
  # [G, K, S] -> [G, K*S]: all first choices, then all second choices, ...
  order_k_major = lambda a: jnp.swapaxes(a, 1, 2).reshape(groups, k * tokens,
                                                          *a.shape[3:])
  one_hot = jax.nn.one_hot(order_k_major(expert_index), num_experts,
                           dtype=jnp.int32)
  one_hot = one_hot * order_k_major(wanted)[..., None]
  arrival = jnp.cumsum(one_hot, axis=1) - 1  # [G, K*S, E]
  position = jnp.sum(arrival * one_hot, axis=-1)  # [G, K*S]
  position = jnp.swapaxes(position.reshape(groups, k, tokens), 1, 2)
  if priority_order is not None:
    inverse = jnp.argsort(priority_order, axis=1)
    position = jnp.take_along_axis(position, inverse[..., None], axis=1)
  return position


def token_choice_with_capacity(expert_index: Array, gates: Array,
                               wanted: Array, capacity: Optional[int],
                               num_experts: int,
                               priority_order: Optional[Array] = None
                               ) -> TokenChoice:
  """Applies expert capacity to K choices per token (any token-choice router).

  Args:
    expert_index: <int32>[G, S, K] chosen experts.
    gates: <float32>[G, S, K] combine weight of each choice.
    wanted: <bool>[G, S, K] choices that compete for slots (real tokens).
    capacity: C, or None on the dropless path (nothing dropped).
    num_experts: E.
    priority_order: <int32>[G, S] tokens in placement order, or None for
      group order.

  Returns:
    A `TokenChoice` whose choices past capacity are dropped.
  """
  if capacity is None:
    position, dispatched = None, wanted
  else:
    position = positions_in_experts(expert_index, wanted, priority_order,
                                    num_experts)
    dispatched = wanted & (position < capacity)
    position = jnp.where(dispatched, position, capacity).astype(jnp.int32)
  return TokenChoice(
      expert_index=expert_index.astype(jnp.int32),
      gates=jnp.where(dispatched, gates, 0.0),
      dispatched=dispatched,
      position=position)
