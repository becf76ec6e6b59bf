"""MegaBlox grouped matmul, the TPU path (see `moe_jax.moe.grouped_matmul`).

`jax.experimental.pallas.ops.tpu.megablox`'s Pallas kernels: `gmm` for the
forward and input-gradient products, `tgmm` for the weight gradient. Off a
TPU they run in Pallas interpret mode (correct, slow: for tests on CPU).

The kernels need M divisible by the row tile and leave rows past
sum(group_sizes) unwritten, so this wrapper pads M, zeroes those rows in the
output and in the input gradient, and has its own custom VJP for that.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from moe_jax.moe.grouped_matmul import sum_to_vary_like, zero_past_groups

Array = jax.Array
# The package's `gmm` name is the differentiable op; the kernels live in
# the module of the same name.
_kernels = importlib.import_module(
    "jax.experimental.pallas.ops.tpu.megablox.gmm")

TILE = 128  # MegaBlox's default tile along M, I (K) and O (N)
MIN_ROW_TILE = 8  # TPU sublanes


def _tiling(num_rows: int) -> tuple[int, int, int]:
  """(tm, tk, tn): 128 each, tm shrunk (multiple of 8) for small M."""
  rows = -(-num_rows // MIN_ROW_TILE) * MIN_ROW_TILE
  return min(TILE, rows), TILE, TILE


def _interpret() -> bool:
  return jax.default_backend() != "tpu"


def _pad_rows(x: Array, tile_rows: int) -> Array:
  return jnp.pad(x, ((0, -x.shape[0] % tile_rows), (0, 0)))


@jax.custom_vjp
def grouped_matmul(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
  """<[M, I]> rows sorted by group, <[E, I, O]>, <int32>[E] -> <[M, O]>."""
  return _forward(lhs, rhs, group_sizes)[0]


def _forward(lhs, rhs, group_sizes):
  tiling = _tiling(lhs.shape[0])
  group_sizes = group_sizes.astype(jnp.int32)
  out = _kernels.gmm(_pad_rows(lhs, tiling[0]), rhs, group_sizes,
                     jnp.result_type(lhs, rhs), tiling,
                     interpret=_interpret())
  out = zero_past_groups(out[:lhs.shape[0]], group_sizes)
  return out, (lhs, rhs, group_sizes)


def _backward(saved, grad):
  lhs, rhs, group_sizes = saved
  tiling = _tiling(lhs.shape[0])
  padded = functools.partial(_pad_rows, tile_rows=tiling[0])
  grad_lhs = _kernels.gmm(padded(grad), rhs, group_sizes, lhs.dtype, tiling,
                          transpose_rhs=True, interpret=_interpret())
  grad_rhs = _kernels.tgmm(padded(lhs).swapaxes(0, 1), padded(grad),
                           group_sizes, rhs.dtype, tiling,
                           num_actual_groups=rhs.shape[0],
                           interpret=_interpret())
  grad_lhs = zero_past_groups(grad_lhs[:lhs.shape[0]], group_sizes)
  return (sum_to_vary_like(grad_lhs, lhs), sum_to_vary_like(grad_rhs, rhs),
          None)


grouped_matmul.defvjp(_forward, _backward)
