"""Capacity math, token grouping, and the three dispatch paths.

Dimension names: B batch, L length, G groups, S tokens per group, D model
width, E experts, K choices per token, C expert capacity, N = G * S.

All three paths compute one function, y[g, s] = sum over dispatched
(token, expert) pairs of gate * expert(x[g, s]):

* `einsum`: one-hot dispatch and combine masks <[G, S, E, C]>, contracted with
  einsums. Dense, shape-static, TPU friendly; memory O(S * E * C).
* `scatter`: tokens written into <[E, G * C, D]> expert buffers by index and
  read back by gather. Memory O(S * K * D); never builds an [S, E, C] array.
* `dropless`: the N * K (token, expert) pairs sorted by expert and fed to one
  grouped matmul (`moe_jax.moe.grouped_matmul`); no capacity, nothing
  dropped. Token choice only.

`PATHS` holds them, all with the signature of `DispatchPath`:
(x <[G, S, D]>, decision, E, experts, C) -> <[G, S, D]>. The capacity paths
call `experts.batched` on <[E, T, D]> buffers, the dropless path
`experts.grouped` on sorted rows; expert parallelism swaps the `ExpertFns`
and leaves the paths alone. Each path shows in profiles as the named scopes
"dispatch", "experts" and "combine".
"""

from __future__ import annotations

import enum
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from moe_jax.moe.experts import ExpertFns
from moe_jax.moe.routing import RoutingDecision, TokenChoice

Array = jax.Array
DispatchPath = Callable[
    [Array, RoutingDecision, int, ExpertFns, Optional[int]], Array]


class Dispatch(str, enum.Enum):
  """Dispatch path of the MoE layer (gin: `MoeLayer.dispatch`)."""
  EINSUM = "einsum"
  SCATTER = "scatter"
  DROPLESS = "dropless"


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float,
                    min_capacity: int) -> int:
  """Slots per expert per group, in T5X's (flaxformer's) convention:

    C = min(S, max(min_capacity, round(capacity_factor * S / E))).

  The number of choices per token k does not enter: a top-2 layer with
  factor 1.25 gives each expert 1.25 * S / E slots for 2 * S / E
  assignments on average, so a factor copied from a T5X gin file gives
  T5X's capacity. (GShard multiplies by k; its factor f at k = 2 is 2 f
  here.) Under expert choice C = capacity_factor * S / E is also the mean
  number of experts a token meets times S / E. `round` is Python's (half to
  even), as flaxformer's `int(round(.))`. The cap at S is ours: no token
  fills two slots of one expert and expert choice takes its top C of S
  tokens, so it changes no output, only the denominator of `expert_usage`
  when min_capacity or capacity_factor * S / E exceeds S.

  Args:
    num_tokens: S, tokens per group.
    num_experts: E.
    capacity_factor: finite, > 0.
    min_capacity: lower bound on C, >= 1.

  Raises:
    ValueError: capacity_factor not finite and > 0, or min_capacity < 1.
  """
  check_capacity_factor("capacity_factor", capacity_factor)
  if min_capacity < 1:
    raise ValueError(f"min_capacity must be >= 1; got {min_capacity}")
  capacity = round(capacity_factor * num_tokens / num_experts)
  return int(min(max(min_capacity, capacity), num_tokens))


def check_capacity_factor(knob: str, value: float) -> None:
  """Raises ValueError naming `knob` unless `value` is finite and > 0."""
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"{knob} must be finite and > 0; got {knob}={value}")


def group_shape(num_tokens: int, max_group_size: int,
                pad_to_group_size: bool,
                group_multiple: int = 1) -> tuple[int, int]:
  """(G, S) for `num_tokens` tokens: S = min(num_tokens, max_group_size).

  With `group_multiple` m (the devices the groups split over), G is rounded
  up to a multiple of m and S shrinks to ceil(num_tokens / G) where that
  rounding changed G. When G * S exceeds the tokens, the last group is
  padded (if `pad_to_group_size`) or a ValueError names the knob.
  """
  if max_group_size < 1:
    raise ValueError(f"max_group_size must be >= 1; got {max_group_size}")
  if group_multiple < 1:
    raise ValueError(f"group_multiple must be >= 1; got {group_multiple}")
  group_size = min(num_tokens, max_group_size)
  num_groups = math.ceil(num_tokens / group_size)
  if num_groups % group_multiple:
    num_groups = math.ceil(num_groups / group_multiple) * group_multiple
    group_size = math.ceil(num_tokens / num_groups)
  if num_groups * group_size != num_tokens and not pad_to_group_size:
    raise ValueError(
        f"{num_groups} groups of at most max_group_size={max_group_size} "
        f"tokens do not split the {num_tokens} tokens of the batch evenly; "
        "choose another max_group_size or batch, or set "
        "pad_to_group_size=True")
  return num_groups, group_size


def group_tokens(x: Array, num_groups: int, group_size: int) -> Array:
  """<[N, ...]> -> <[G, S, ...]>, zero-padding N up to G * S."""
  pad = num_groups * group_size - x.shape[0]
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(num_groups, group_size, *x.shape[1:])


def _buffers_through_experts(buffers: Array, experts: ExpertFns) -> Array:
  """<[G, E, C, D]> through the experts as <[E, G * C, D]>, keeping the
  layout."""
  groups, num_experts, capacity, width = buffers.shape
  stacked = jnp.swapaxes(buffers, 0, 1).reshape(num_experts,
                                                groups * capacity, width)
  with jax.named_scope("experts"):
    out = experts.batched(stacked)
  out = out.reshape(num_experts, groups, capacity, width)
  return jnp.swapaxes(out, 0, 1)


def einsum_masks(decision: RoutingDecision, num_experts: int, capacity: int,
                 group_size: int) -> tuple[Array, Array]:
  """One-hot dispatch mask and combine weights, both <float32>[G, S, E, C].

  Tokens not dispatched (dropped, skipped, padding) have all-zero rows.
  """
  if isinstance(decision, TokenChoice):
    dispatch = 0.0
    combine = 0.0
    for k in range(decision.expert_index.shape[-1]):
      expert = jax.nn.one_hot(decision.expert_index[..., k], num_experts)
      slot = jax.nn.one_hot(decision.position[..., k], capacity)
      # position == capacity (not dispatched) one-hots to a zero row.
      mask = expert[..., :, None] * slot[..., None, :]
      dispatch = dispatch + mask
      combine = combine + mask * decision.gates[..., k, None, None]
    return dispatch, combine
  # Expert choice: slot (e, c) holds token s. [G, E, C, S] -> [G, S, E, C].
  dispatch = jax.nn.one_hot(decision.token_index, group_size)
  dispatch = dispatch * decision.dispatched[..., None]
  combine = dispatch * decision.gates[..., None]
  to_token_major = lambda a: jnp.moveaxis(a, -1, 1)
  return to_token_major(dispatch), to_token_major(combine)


def einsum_dispatch(x: Array, decision: RoutingDecision, num_experts: int,
                    experts: ExpertFns, capacity: int) -> Array:
  """Dispatch and combine with one-hot masks. x: [G, S, D] -> [G, S, D]."""
  with jax.named_scope("dispatch"):
    dispatch, combine = einsum_masks(decision, num_experts, capacity,
                                     x.shape[1])
    buffers = jnp.einsum("gsec,gsd->gecd", dispatch.astype(x.dtype), x)
  out = _buffers_through_experts(buffers, experts)
  with jax.named_scope("combine"):
    return jnp.einsum("gsec,gecd->gsd", combine.astype(out.dtype), out)


def scatter_dispatch(x: Array, decision: RoutingDecision, num_experts: int,
                     experts: ExpertFns, capacity: int) -> Array:
  """Dispatch by index into <[G, E*C, D]> buffers, combine by gather."""
  groups, group_size, width = x.shape
  group_index = jnp.arange(groups)[:, None, None]
  to_experts = lambda buffers: _buffers_through_experts(
      buffers.reshape(groups, num_experts, capacity, width), experts)
  if isinstance(decision, TokenChoice):
    with jax.named_scope("dispatch"):
      # Undispatched choices point one past the end: dropped / read as 0.
      slot = jnp.where(decision.dispatched,
                       decision.expert_index * capacity + decision.position,
                       num_experts * capacity)  # [G, S, K]
      k = slot.shape[-1]
      tokens = jnp.broadcast_to(x[:, :, None, :],
                                (groups, group_size, k, width))
      buffers = jnp.zeros((groups, num_experts * capacity, width), x.dtype)
      buffers = buffers.at[group_index, slot].add(tokens, mode="drop")
    out = to_experts(buffers).reshape(groups, num_experts * capacity, width)
    with jax.named_scope("combine"):
      gathered = out.at[group_index, slot].get(mode="fill", fill_value=0)
      return jnp.einsum("gsk,gskd->gsd", decision.gates.astype(out.dtype),
                        gathered)
  with jax.named_scope("dispatch"):
    token_index = decision.token_index.reshape(groups, -1)  # [G, E*C]
    buffers = jnp.take_along_axis(x, token_index[..., None], axis=1)
    buffers = buffers * decision.dispatched.reshape(groups, -1, 1).astype(
        x.dtype)
  out = to_experts(buffers)
  with jax.named_scope("combine"):
    weighted = out.reshape(groups, -1, width) * decision.gates.reshape(
        groups, -1, 1).astype(out.dtype)
    combined = jnp.zeros((groups, group_size, width), out.dtype)
    return combined.at[group_index[..., 0], token_index].add(weighted)


def sort_by_expert(expert_index: Array,
                   num_experts: int) -> tuple[Array, Array]:
  """The dropless path's row order: (order <int32>[M], group sizes
  <int32>[E]) for the M = G * S * K (token, choice) pairs of `expert_index`
  <int32>[G, S, K] flattened; pair order[i] is the i-th row, sorted by
  expert, pairs of one expert in their flat order."""
  expert_of_pair = expert_index.reshape(-1)  # [M]
  order = jnp.argsort(expert_of_pair, stable=True)
  return order, jnp.bincount(expert_of_pair,
                             length=num_experts).astype(jnp.int32)


def dropless_dispatch(x: Array, decision: TokenChoice, num_experts: int,
                      experts: ExpertFns,
                      capacity: Optional[int] = None) -> Array:
  """Sort (token, choice) pairs by expert; one grouped matmul; unsort.

  Every pair is computed (padding and skipped choices carry gate 0), so the
  shapes are static: M = G * S * K rows. `capacity` is unused: nothing is
  dropped.
  """
  del capacity
  if not isinstance(decision, TokenChoice):
    raise ValueError("the dropless dispatch path needs token choice routing; "
                     f"got {type(decision).__name__}")
  with jax.named_scope("dispatch"):
    rows, order, group_sizes = permute(x, decision.expert_index, num_experts)
  with jax.named_scope("experts"):
    out_sorted = experts.grouped(rows, group_sizes)
  with jax.named_scope("combine"):
    return unpermute_and_combine(out_sorted, order, decision.gates)


def permute(x: Array, expert_index: Array,
            num_experts: int) -> tuple[Array, Array, Array]:
  """x <[G, S, D]>, expert_index <int32>[G, S, K] -> (rows <[M, D]> sorted
  by expert, order <int32>[M], group sizes <int32>[E]; see
  `sort_by_expert`)."""
  k = expert_index.shape[-1]
  order, group_sizes = sort_by_expert(expert_index, num_experts)
  rows = jnp.take(x.reshape(-1, x.shape[-1]), order // k, axis=0)
  return rows, order, group_sizes


def unpermute_and_combine(out_sorted: Array, order: Array,
                          gates: Array) -> Array:
  """The inverse of `permute`: rows <[M, D]> back to (token, choice) order,
  each token's K results summed by gates <[G, S, K]> -> <[G, S, D]>.

  The rows are gathered by the inverse permutation (<int32>[M], built by
  scattering integers), not scattered: a float scatter's JVP carries an
  integer <[M, D]> copy of its indices, a gather's does not, and its
  transpose is one scatter-add."""
  inverse = jnp.zeros_like(order).at[order].set(
      jnp.arange(order.shape[0], dtype=order.dtype), unique_indices=True)
  out = jnp.take(out_sorted, inverse, axis=0)
  out = out.reshape(*gates.shape, out_sorted.shape[-1])
  return jnp.einsum("gsk,gskd->gsd", gates.astype(out.dtype), out)


PATHS: dict[Dispatch, DispatchPath] = {
    Dispatch.EINSUM: einsum_dispatch,
    Dispatch.SCATTER: scatter_dispatch,
    Dispatch.DROPLESS: dropless_dispatch,
}
