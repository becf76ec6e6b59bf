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

`auto` (the default) picks by `jax.default_backend()`: `blocked` on CPU
(several times faster than `ragged_dot` there, see benchmarks/README.md),
`megablox` on TPU, `tokamax` on GPU (itself `ragged_dot` when the
`[tokamax]` extra is not installed).
"""

from __future__ import annotations

import enum
import importlib
from typing import Callable

import jax
import jax.numpy as jnp

from moe_jax import knobs

Array = jax.Array
GroupedMatmulFn = Callable[[Array, Array, Array], Array]


class GroupedMatmul(str, enum.Enum):
  """Grouped matmul of the dropless path (gin: `MoeLayer.grouped_matmul`).

  AUTO: the backend's choice (`BY_BACKEND`; default).
  RAGGED_DOT: `jax.lax.ragged_dot`, XLA's grouped matmul.
  DENSE: every row against every expert, then the row's own result kept;
    E times the work, for tests.
  BLOCKED: each expert's rows walked in chunks read in place from the
    sorted rows, one plain dot per chunk (`moe_jax.moe.kernels.blocked`);
    fast on CPU.
  MEGABLOX: the Pallas TPU kernels of
    `jax.experimental.pallas.ops.tpu.megablox`; interpreted (slow) off TPU.
  TOKAMAX: `tokamax.ragged_dot` (GPU kernels; the `[tokamax]` extra),
    `ragged_dot` when tokamax is not importable.
  """
  AUTO = "auto"
  RAGGED_DOT = "ragged_dot"
  DENSE = "dense"
  BLOCKED = "blocked"
  MEGABLOX = "megablox"
  TOKAMAX = "tokamax"


# What `auto` means on each `jax.default_backend()`; others get ragged_dot.
BY_BACKEND = {
    "cpu": GroupedMatmul.BLOCKED,
    "gpu": GroupedMatmul.TOKAMAX,
    "tpu": GroupedMatmul.MEGABLOX,
}


def resolve(choice: GroupedMatmul | str) -> GroupedMatmulFn:
  """The `grouped_matmul(lhs, rhs, group_sizes)` function of `choice`."""
  module = importlib.import_module(
      f"moe_jax.moe.kernels.{concrete(choice).value}")
  return module.grouped_matmul


def concrete(choice: GroupedMatmul | str) -> GroupedMatmul:
  """`choice`, with `auto` replaced by this backend's implementation."""
  choice = knobs.choice(GroupedMatmul, "grouped_matmul", choice)
  if choice != GroupedMatmul.AUTO:
    return choice
  return BY_BACKEND.get(jax.default_backend(), GroupedMatmul.RAGGED_DOT)


def zero_past_groups(out: Array, group_sizes: Array) -> Array:
  """<[M, O]> with rows past sum(group_sizes) set to 0 (the contract)."""
  valid = jnp.arange(out.shape[0]) < jnp.sum(group_sizes)
  return jnp.where(valid[:, None], out, 0)


def sum_to_vary_like(cotangent: Array, primal: Array) -> Array:
  """A custom VJP's `cotangent`, summed over the `jax.shard_map` mesh axes
  it varies over and `primal` does not (a weight shared by row shards gets
  their summed gradient); a custom VJP must return its input's type.
  No-op outside shard_map."""
  extra = tuple(sorted(_varying(cotangent) - _varying(primal)))
  return jax.lax.psum(cotangent, extra) if extra else cotangent


def _varying(x: Array) -> frozenset[str]:
  """The shard_map mesh axes x varies over (jax 0.10: `aval.mat.varying`)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  return frozenset(mat.varying if mat is not None else
                   getattr(aval, "vma", ()))
