"""`tokamax.ragged_dot`, GPU Pallas kernels (see `moe_jax.moe.grouped_matmul`).

Tokamax (PyPI `tokamax`, the `[tokamax]` extra: Python >= 3.12, jax >=
0.11) has Triton and Mosaic GPU kernels for the forward and both backward
products, and picks its own implementation per device. Without it this
choice falls back to `jax.lax.ragged_dot` and logs once which extra to
install.
"""

import functools
import logging

import jax

from moe_jax.moe.grouped_matmul import zero_past_groups

try:
  import tokamax
except ImportError:
  tokamax = None

Array = jax.Array
EXTRA = "pip install 'moe_jax[tokamax]' (Python >= 3.12, jax >= 0.11)"


@functools.cache
def _warn_fallback() -> None:
  logging.warning("grouped_matmul='tokamax': tokamax is not importable; "
                  "using jax.lax.ragged_dot instead. For the kernels: %s",
                  EXTRA)


def grouped_matmul(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
  """<[M, I]> rows sorted by group, <[E, I, O]>, <int32>[E] -> <[M, O]>."""
  if tokamax is None:
    _warn_fallback()
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)
  # The contract's 0 rows past the groups, whatever the kernel leaves there.
  return zero_past_groups(tokamax.ragged_dot(lhs, rhs, group_sizes),
                          group_sizes)
