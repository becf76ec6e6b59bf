"""The grouped matmul under the dropless path: a named choice, resolved here.

A grouped matmul multiplies rows sorted by expert, each by its own expert's
matrix:

  out[m] = lhs[m] @ rhs[e(m)],  e(m) = the group row m falls in,

with lhs <[M, I]>, rhs <[E, I, O]>, group_sizes <int32>[E] (row counts, in
order; empty groups allowed) and out <[M, O]>. M sorted rows, E experts, I
the contracted width, O the output width. Rows past sum(group_sizes) belong
to no group and come out as 0 (expert parallelism relies on this).

Every choice lives in its own module `moe_jax.moe.kernels.<value>` with a
`grouped_matmul(lhs, rhs, group_sizes)` function, imported only when chosen
(a GPU or TPU kernel may need imports the other backends lack). Adding a
kernel: that module, one `GroupedMatmul` value, and
tests/test_grouped_matmul.py checks it against `ragged_dot`.
"""

from __future__ import annotations

import enum
import importlib
from typing import Callable

import jax

from moe_jax import knobs

Array = jax.Array
GroupedMatmulFn = Callable[[Array, Array, Array], Array]


class GroupedMatmul(str, enum.Enum):
  """Grouped matmul of the dropless path (gin: `MoeLayer.grouped_matmul`).

  RAGGED_DOT: `jax.lax.ragged_dot`, XLA's grouped matmul (default).
  DENSE: every row against every expert, then the row's own result kept;
    E times the work, for tests.
  """
  RAGGED_DOT = "ragged_dot"
  DENSE = "dense"


def resolve(choice: GroupedMatmul | str) -> GroupedMatmulFn:
  """The `grouped_matmul(lhs, rhs, group_sizes)` function of `choice`."""
  module = importlib.import_module(
      "moe_jax.moe.kernels."
      f"{knobs.choice(GroupedMatmul, 'grouped_matmul', choice).value}")
  return module.grouped_matmul
