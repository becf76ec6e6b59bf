"""A blocked grouped matmul for CPUs (see `moe_jax.moe.grouped_matmul`).

Each group's rows are contiguous in the sorted input, so a loop over the
experts slices its expert's matrix once and then walks the group in chunks,
reading each chunk straight from the sorted rows (no copy into padded block
buffers): one plain <[H, I]> @ <[I, O]> dot per chunk of H rows. A group is
cut into chunks of a few heights (by default powers of two, from about the
mean group size down to 8): whole chunks of the largest that fit, then of
each smaller one, then one masked chunk of the smallest for the rest. That
chunk may reach into the next group's rows; those rows are masked out (kept
as they were in the output, zero in the weight gradient). The work is that
of the rows plus at most 7 masked rows per group (by default), never E
times it. The backward pass walks the same chunks for the input gradient,
against transposed matrices. The weight gradient takes the first C rows of
every group (C the largest height) as one batched <[E, C, I]>^T <[E, C, O]>
dot, which writes every expert's <[I, O]> slot at once (no zero-filled
<[E, I, O]> buffer), and adds the rest of each group chunk by chunk, in
place. Nothing of size M is kept besides the operands; results are exact
up to float summation order.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.moe.grouped_matmul import sum_to_vary_like

Array = jax.Array

# Bounds on the largest default chunk height, and the smallest height.
LARGEST_HEIGHT_BOUNDS = (16, 128)
SMALLEST_HEIGHT = 8


class Groups(NamedTuple):
  """Where each group's rows are in the sorted rows.

  start: <int32>[E] index of the group's first row.
  size: <int32>[E] the group's row count.
  """
  start: Array
  size: Array


def chunk_heights(num_rows: int, num_groups: int) -> tuple[int, ...]:
  """The default chunk heights: the powers of two from the largest <= the
  mean group size (clipped to `LARGEST_HEIGHT_BOUNDS`) down to
  `SMALLEST_HEIGHT`, none above M = `num_rows` (a chunk must fit inside the
  rows); (M,) if M is below them all."""
  mean = max(num_rows // num_groups, 1)
  low, high = LARGEST_HEIGHT_BOUNDS
  height = min(max(1 << (mean.bit_length() - 1), low), high)
  heights = []
  while height >= SMALLEST_HEIGHT:
    if height <= num_rows:
      heights.append(height)
    height //= 2
  return tuple(heights) or (num_rows,)


def groups(group_sizes: Array) -> Groups:
  """<int32>[E] row counts -> their `Groups`."""
  size = group_sizes.astype(jnp.int32)
  return Groups(jnp.cumsum(size) - size, size)


def _zeros(shape: tuple[int, ...], *like: Array) -> Array:
  """Zeros of `like`'s result dtype that vary over the mesh axes `like` do
  (inside `jax.shard_map` a loop carry must keep its type)."""
  dtype = jnp.result_type(*like)
  return sum((jnp.zeros_like(x, dtype, shape=()) for x in like),
             jnp.zeros(shape, dtype))


Carry = Any  # a pytree of arrays
ChunkFn = Callable[[Array, Array, Array, Carry], Carry]


def _over_chunks(where: Groups, heights: tuple[int, ...], num_rows: int,
                 chunk: ChunkFn, per_expert: Callable[[Array, Carry], Carry],
                 init: Carry) -> Carry:
  """Folds `chunk` over every group's chunks of the sorted rows.

  Each group is cut into chunks of the `heights` in turn (descending, each
  in [1, M] for M = `num_rows`): as many whole chunks of each height as the
  group's remaining rows fill, then one chunk of the last height, masked,
  for what is left: at most H - 1 masked rows per group, H the last height
  (with halving heights, at most one chunk of each after the first, so a
  group costs few dots and few wasted rows). For expert e,
  per_expert(e, carry) gives the carry of its first chunk; chunk(e, at,
  valid, carry) sees a chunk of H rows as rows [at, at + H) of the M rows,
  `valid` <bool>[H] marking those of group e (a chunk past row M - H is
  moved back to end at M and its leading rows masked). Returns the carry
  after the last group.
  """

  def expert(e, carry):
    begin, end = where.start[e], where.start[e] + where.size[e]
    carry = per_expert(e, carry)
    for index, height in enumerate(heights):
      last = index == len(heights) - 1
      count = (end - begin + (height - 1 if last else 0)) // height

      def step(j, carry, begin=begin, height=height):
        first = begin + j * height
        at = jnp.minimum(first, num_rows - height)
        row = at + jnp.arange(height)
        return chunk(e, at, (row >= first) & (row < end), carry)

      carry = jax.lax.fori_loop(0, count, step, carry)
      begin = begin + count * height
    return carry

  return jax.lax.fori_loop(0, where.size.shape[0], expert, init)


def _rows_times(x: Array, rhs: Array, where: Groups, heights: tuple[int, ...],
                transpose_rhs: bool) -> Array:
  """out[m] = x[m] @ rhs[e(m)] (or its transpose), rows past the groups 0.

  x <[M, I]>, rhs <[E, I, O]> -> <[M, O]> (<[M, I]> from x <[M, O]> when
  `transpose_rhs`).
  """
  width = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  contract = 1 if transpose_rhs else 0
  num_rows = x.shape[0]

  def chunk(e, at, valid, carry):
    del e  # the matrix is in the carry
    out, matrix = carry
    height = valid.shape[0]
    product = jax.lax.dot_general(
        jax.lax.dynamic_slice_in_dim(x, at, height), matrix,
        (((1,), (contract,)), ((), ())), preferred_element_type=out.dtype)
    kept = jax.lax.dynamic_slice_in_dim(out, at, height)
    return jax.lax.dynamic_update_slice_in_dim(
        out, jnp.where(valid[:, None], product, kept), at, 0), matrix

  # The expert's matrix is sliced once per expert, not once per chunk.
  out, _ = _over_chunks(where, heights, num_rows, chunk,
                        lambda e, carry: (carry[0], rhs[e]),
                        (_zeros((num_rows, width), x, rhs), rhs[0]))
  return out


def _group_heads(a: Array, where: Groups, head: int) -> Array:
  """<[M, W]> -> <[E, C, W]>: the first C = `head` rows of every group,
  zero past the group's end (C <= M)."""
  row = jnp.arange(head)
  index = jnp.minimum(where.start[:, None] + row, a.shape[0] - 1)  # [E, C]
  return jnp.where((row < where.size[:, None])[..., None],
                   jnp.take(a, index, axis=0), 0)


def _weight_grad(x: Array, grad: Array, where: Groups,
                 heights: tuple[int, ...]) -> Array:
  """<[E, I, O]>: sum over group e's rows m of x[m]^T grad[m].

  The first C = heights[0] rows of every group (x and grad gathered into
  <[E, C, I]> and <[E, C, O]>) go through one batched dot, which also
  writes every expert's slot; the rest of each group is walked in chunks
  and added to its slot in place.
  """
  head = heights[0]
  total = jnp.einsum("ecp,ecq->epq", _group_heads(x, where, head),
                     _group_heads(grad, where, head),
                     preferred_element_type=jnp.result_type(x, grad))
  used = jnp.minimum(where.size, head)

  def chunk(e, at, valid, total):
    height = valid.shape[0]
    part = jnp.where(valid[:, None],
                     jax.lax.dynamic_slice_in_dim(x, at, height), 0)
    update = jax.lax.dot_general(
        part, jax.lax.dynamic_slice_in_dim(grad, at, height),
        (((0,), (0,)), ((), ())), preferred_element_type=total.dtype)
    return jax.lax.dynamic_update_index_in_dim(total, total[e] + update, e,
                                               0)

  return _over_chunks(Groups(where.start + used, where.size - used), heights,
                      x.shape[0], chunk, lambda e, total: total, total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(lhs: Array, rhs: Array, where: Groups,
             heights: tuple[int, ...]) -> Array:
  return _rows_times(lhs, rhs, where, heights, False)


def _blocked_fwd(lhs, rhs, where, heights):
  return _blocked(lhs, rhs, where, heights), (lhs, rhs, where)


def _blocked_bwd(heights, saved, grad):
  lhs, rhs, where = saved
  grad_lhs = _rows_times(grad, rhs, where, heights, True)
  grad_rhs = _weight_grad(lhs, grad, where, heights)
  no_grad = jax.tree.map(lambda _: None, where)
  return (sum_to_vary_like(grad_lhs.astype(lhs.dtype), lhs),
          sum_to_vary_like(grad_rhs.astype(rhs.dtype), rhs), no_grad)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def grouped_matmul(lhs: Array, rhs: Array, group_sizes: Array,
                   heights: tuple[int, ...] | None = None) -> Array:
  """<[M, I]> rows sorted by group, <[E, I, O]>, <int32>[E] -> <[M, O]>.

  heights: the chunk heights, descending, each in [1, M] (default
  `chunk_heights`); see `_over_chunks`.
  """
  num_rows = lhs.shape[0]
  if num_rows == 0:  # no rows: nothing to chunk
    return jnp.zeros((0, rhs.shape[2]), jnp.result_type(lhs, rhs))
  if heights is None:
    heights = chunk_heights(num_rows, rhs.shape[0])
  heights = tuple(heights)
  if (not heights or list(heights) != sorted(heights, reverse=True)
      or not all(1 <= h <= num_rows for h in heights)):
    raise ValueError(f"heights={heights} must be descending, each in "
                     f"[1, M={num_rows}]")
  return _blocked(lhs, rhs, groups(group_sizes), heights)
