"""A dense reference grouped matmul (see moe_jax.moe.grouped_matmul).

Every row meets every expert's matrix and a one-hot of the row's group keeps
its own result: plain einsums, E times the useful work; for tests.
"""

import jax
import jax.numpy as jnp

Array = jax.Array


def grouped_matmul(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
  """<[M, I]> rows sorted by group, <[E, I, O]>, <int32>[E] -> <[M, O]>."""
  ends = jnp.cumsum(group_sizes)  # [E]
  # Row m is in group e when ends[e - 1] <= m < ends[e]; E past the last.
  group = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")
  in_group = jax.nn.one_hot(group, rhs.shape[0], dtype=lhs.dtype)  # [M, E]
  per_expert = jnp.einsum("mp,epq->emq", lhs, rhs)
  return jnp.einsum("me,emq->mq", in_group, per_expert)
