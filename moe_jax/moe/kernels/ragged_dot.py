"""`jax.lax.ragged_dot`, XLA's grouped matmul (see `grouped_matmul`)."""

import jax

Array = jax.Array


def grouped_matmul(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
  """<[M, I]> rows sorted by group, <[E, I, O]>, <int32>[E] -> <[M, O]>."""
  return jax.lax.ragged_dot(lhs, rhs, group_sizes)
