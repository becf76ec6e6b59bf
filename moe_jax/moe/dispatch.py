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
  grouped matmul (`jax.lax.ragged_dot`); no capacity, nothing dropped.
  Token choice only.

`expert_fn` maps <[E, T, D]> to <[E, T, D]> (one batched matmul over the
leading expert axis); `grouped_expert_fn` maps sorted rows <[M, D]> and
<int32>[E] group sizes to <[M, D]>.
"""

from __future__ import annotations

import enum
import math
from typing import Callable

import jax
import jax.numpy as jnp

from moe_jax.moe.routing import RoutingDecision, TokenChoice

Array = jax.Array
ExpertFn = Callable[[Array], Array]
GroupedExpertFn = Callable[[Array, Array], Array]


class Dispatch(str, enum.Enum):
  """Dispatch path of the MoE layer (gin: `MoeLayer.dispatch`)."""
  EINSUM = "einsum"
  SCATTER = "scatter"
  DROPLESS = "dropless"


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float,
                    min_capacity: int, num_selected_experts: int = 1) -> int:
  """Slots per expert per group.

    C = max(min_capacity, round(capacity_factor * S * k / E)), capped at S.

  k multiplies (as in GShard): each token makes k assignments, so the
  capacity factor is the ratio of slots to assignments and padding costs
  `capacity_factor` times the useful expert work for any k. (flaxformer leaves
  k out: its factor 2.0 at k = 2 equals 1.0 here.) Expert choice uses k = 1.
  The cap at S holds because no token can fill two slots of one expert.

  Args:
    num_tokens: S, tokens per group.
    num_experts: E.
    capacity_factor: > 0.
    min_capacity: lower bound on C.
    num_selected_experts: k.
  """
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor must be > 0; got {capacity_factor}")
  capacity = round(capacity_factor * num_tokens * num_selected_experts /
                   num_experts)
  return int(min(max(min_capacity, capacity), num_tokens))


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


def _expert_buffers_to_experts(buffers: Array, expert_fn: ExpertFn) -> Array:
  """<[G, E, C, D]> through experts, keeping the layout."""
  groups, experts, capacity, width = buffers.shape
  stacked = jnp.swapaxes(buffers, 0, 1).reshape(experts, groups * capacity,
                                                width)
  out = expert_fn(stacked).reshape(experts, groups, capacity, width)
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
                    expert_fn: ExpertFn, capacity: int) -> Array:
  """Dispatch and combine with one-hot masks. x: [G, S, D] -> [G, S, D]."""
  dispatch, combine = einsum_masks(decision, num_experts, capacity, x.shape[1])
  buffers = jnp.einsum("gsec,gsd->gecd", dispatch.astype(x.dtype), x)
  out = _expert_buffers_to_experts(buffers, expert_fn)
  return jnp.einsum("gsec,gecd->gsd", combine.astype(out.dtype), out)


def scatter_dispatch(x: Array, decision: RoutingDecision, num_experts: int,
                     expert_fn: ExpertFn, capacity: int) -> Array:
  """Dispatch by index into <[G, E*C, D]> buffers, combine by gather."""
  groups, group_size, width = x.shape
  group_index = jnp.arange(groups)[:, None, None]
  if isinstance(decision, TokenChoice):
    # Undispatched choices point one past the end and are dropped / read as 0.
    slot = jnp.where(decision.dispatched,
                     decision.expert_index * capacity + decision.position,
                     num_experts * capacity)  # [G, S, K]
    k = slot.shape[-1]
    tokens = jnp.broadcast_to(x[:, :, None, :], (groups, group_size, k, width))
    buffers = jnp.zeros((groups, num_experts * capacity, width), x.dtype)
    buffers = buffers.at[group_index, slot].add(tokens, mode="drop")
    out = _expert_buffers_to_experts(
        buffers.reshape(groups, num_experts, capacity, width), expert_fn)
    out = out.reshape(groups, num_experts * capacity, width)
    gathered = out.at[group_index, slot].get(mode="fill", fill_value=0)
    return jnp.einsum("gsk,gskd->gsd", decision.gates.astype(out.dtype),
                      gathered)
  token_index = decision.token_index.reshape(groups, -1)  # [G, E*C]
  buffers = jnp.take_along_axis(x, token_index[..., None], axis=1)
  buffers = buffers * decision.dispatched.reshape(groups, -1, 1).astype(x.dtype)
  out = _expert_buffers_to_experts(
      buffers.reshape(groups, num_experts, capacity, width), expert_fn)
  weighted = out.reshape(groups, -1, width) * decision.gates.reshape(
      groups, -1, 1).astype(out.dtype)
  combined = jnp.zeros((groups, group_size, width), out.dtype)
  return combined.at[group_index[..., 0], token_index].add(weighted)


def dropless_dispatch(x: Array, decision: TokenChoice, num_experts: int,
                      grouped_expert_fn: GroupedExpertFn) -> Array:
  """Sort (token, choice) pairs by expert; one grouped matmul; unsort.

  Every pair is computed (padding and skipped choices carry gate 0), so the
  shapes are static: M = G * S * K rows.
  """
  if not isinstance(decision, TokenChoice):
    raise ValueError("the dropless dispatch path needs token choice routing; "
                     f"got {type(decision).__name__}")
  groups, group_size, width = x.shape
  k = decision.expert_index.shape[-1]
  experts = decision.expert_index.reshape(-1)  # [M]
  order = jnp.argsort(experts, stable=True)  # [M]
  token_of_row = order // k
  rows = jnp.take(x.reshape(-1, width), token_of_row, axis=0)  # [M, D]
  group_sizes = jnp.bincount(experts, length=num_experts).astype(jnp.int32)
  out_sorted = grouped_expert_fn(rows, group_sizes)
  out = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
  out = out.reshape(groups, group_size, k, width)
  return jnp.einsum("gsk,gskd->gsd", decision.gates.astype(out.dtype), out)
