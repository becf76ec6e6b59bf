"""`jax.lax.ragged_dot`, XLA's grouped matmul (see `grouped_matmul`)."""

import jax

Array = jax.Array


def grouped_matmul(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
  """<[M, P]> rows sorted by group, <[E, P, Q]>, <int32>[E] -> <[M, Q]>."""
  return jax.lax.ragged_dot(lhs, rhs, group_sizes)
