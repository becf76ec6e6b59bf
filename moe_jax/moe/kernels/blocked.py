"""A blocked grouped matmul for CPUs (see `moe_jax.moe.grouped_matmul`).

Each group's rows are copied into whole blocks of B rows (the last one of a
group zero-padded), so every block belongs to one expert. A loop then runs
one plain <[B, I]> @ <[I, O]> dot per block against its expert's matrix,
visiting only the blocks in use: the work is that of the rows plus at most
B - 1 padding rows per group, never E times it, and each dot is the large
contiguous kind a CPU does at full speed. The backward pass reuses the
layout: the input gradient is the same loop against transposed matrices and
the weight gradient adds each block's <[I, B]> @ <[B, O]> into its expert's
slot. Shapes are static (NB = M // B + E blocks reserved); results are
exact up to float summation order.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.moe.grouped_matmul import sum_to_vary_like

Array = jax.Array

MAX_BLOCK_ROWS = 128
MIN_BLOCK_ROWS = 16


class Layout(NamedTuple):
  """Where each sorted row sits in the block buffer; NB blocks of B rows.

  slot: <int32>[M] row index into the flat <[NB * B]> buffer (NB * B for
    rows past sum(group_sizes), which read as 0 and are never written).
  block_expert: <int32>[NB] expert of each block.
  num_blocks: <int32>[] blocks in use (the first `num_blocks`).
  """
  slot: Array
  block_expert: Array
  num_blocks: Array


def block_rows(num_rows: int, num_groups: int) -> int:
  """B: the largest power of two <= the mean group size, in [16, 128]."""
  mean = max(num_rows // num_groups, 1)
  rows = 1 << (mean.bit_length() - 1)
  return min(max(rows, MIN_BLOCK_ROWS), MAX_BLOCK_ROWS)


def layout(group_sizes: Array, num_rows: int, rows: int) -> Layout:
  """The block layout of M = `num_rows` sorted rows, B = `rows`."""
  num_groups = group_sizes.shape[0]
  capacity = num_rows // rows + num_groups  # >= sum(ceil(size / B))
  blocks = (group_sizes + rows - 1) // rows  # [E]
  block_end = jnp.cumsum(blocks)  # [E]
  row_end = jnp.cumsum(group_sizes)  # [E]
  row = jnp.arange(num_rows)
  group = jnp.searchsorted(row_end, row, side="right")  # [M]; E past all
  in_group = group < num_groups
  group = jnp.minimum(group, num_groups - 1)
  local = row - (row_end - group_sizes)[group]
  first_slot = (block_end - blocks)[group] * rows
  slot = jnp.where(in_group, first_slot + local, capacity * rows)
  block_expert = jnp.searchsorted(block_end, jnp.arange(capacity),
                                  side="right")
  return Layout(slot.astype(jnp.int32),
                jnp.minimum(block_expert, num_groups - 1).astype(jnp.int32),
                block_end[-1].astype(jnp.int32))


def _to_blocks(x: Array, where: Layout, rows: int) -> Array:
  """<[M, W]> sorted rows -> <[NB, B, W]> blocks, padding 0."""
  capacity = where.block_expert.shape[0]
  flat = jnp.zeros((capacity * rows, x.shape[1]), x.dtype)
  flat = flat.at[where.slot].set(x, mode="drop")
  return flat.reshape(capacity, rows, x.shape[1])


def _from_blocks(blocks: Array, where: Layout) -> Array:
  """<[NB, B, W]> -> <[M, W]>; rows past the groups are 0."""
  flat = blocks.reshape(-1, blocks.shape[-1])
  return flat.at[where.slot].get(mode="fill", fill_value=0)


def _zeros(shape: tuple[int, ...], *like: Array) -> Array:
  """Zeros of `like`'s result dtype that vary over the mesh axes `like` do
  (inside `jax.shard_map` a loop carry must keep its type)."""
  dtype = jnp.result_type(*like)
  return sum((jnp.zeros_like(x, dtype, shape=()) for x in like),
             jnp.zeros(shape, dtype))


def _per_block(x: Array, rhs: Array, where: Layout,
               transpose_rhs: bool) -> Array:
  """out[n] = x[n] @ rhs[e_n] (or its transpose) for the blocks in use.

  x <[NB, B, I]>, rhs <[E, I, O]> -> <[NB, B, O]> (<[NB, B, I]> from
  x <[NB, B, O]> when `transpose_rhs`); unused blocks stay 0.
  """
  width = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  contract = 1 if transpose_rhs else 0

  def body(n, out):
    product = jax.lax.dot_general(
        x[n], rhs[where.block_expert[n]], (((1,), (contract,)), ((), ())),
        preferred_element_type=out.dtype)
    return jax.lax.dynamic_update_index_in_dim(out, product, n, 0)

  out = _zeros(x.shape[:2] + (width,), x, rhs)
  return jax.lax.fori_loop(0, where.num_blocks, body, out)


def _weight_grad(x: Array, grad: Array, where: Layout,
                 num_groups: int) -> Array:
  """<[E, I, O]>: sum over expert e's blocks of x[n]^T @ grad[n]."""

  def body(n, total):
    expert = where.block_expert[n]
    update = jax.lax.dot_general(x[n], grad[n], (((0,), (0,)), ((), ())),
                                 preferred_element_type=total.dtype)
    return jax.lax.dynamic_update_index_in_dim(
        total, total[expert] + update, expert, 0)

  total = _zeros((num_groups, x.shape[2], grad.shape[2]), x, grad)
  return jax.lax.fori_loop(0, where.num_blocks, body, total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(lhs: Array, rhs: Array, where: Layout, rows: int) -> Array:
  blocks = _per_block(_to_blocks(lhs, where, rows), rhs, where, False)
  return _from_blocks(blocks, where)


def _blocked_fwd(lhs, rhs, where, rows):
  return _blocked(lhs, rhs, where, rows), (lhs, rhs, where)


def _blocked_bwd(rows, saved, grad):
  lhs, rhs, where = saved
  grad_blocks = _to_blocks(grad, where, rows)
  grad_lhs = _from_blocks(_per_block(grad_blocks, rhs, where, True), where)
  grad_rhs = _weight_grad(_to_blocks(lhs, where, rows), grad_blocks, where,
                          rhs.shape[0])
  no_grad = jax.tree.map(lambda _: None, where)
  return (sum_to_vary_like(grad_lhs.astype(lhs.dtype), lhs),
          sum_to_vary_like(grad_rhs.astype(rhs.dtype), rhs), no_grad)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def grouped_matmul(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
  """<[M, I]> rows sorted by group, <[E, I, O]>, <int32>[E] -> <[M, O]>."""
  rows = block_rows(lhs.shape[0], rhs.shape[0])
  where = layout(group_sizes.astype(jnp.int32), lhs.shape[0], rows)
  return _blocked(lhs, rhs, where, rows)
