"""Stacked expert MLPs: every weight has a leading expert axis.

Dimension names: E experts, D model width, F expert hidden width (d_ff),
T tokens per expert (capacity paths), M sorted rows (dropless path).

`Experts` only creates the weights; `apply_experts` is the pure MLP over
them, and `ExpertFns` binds the two to the layouts the dispatch paths use:
* batched, x <[E, T, D]>: one einsum over the leading expert axis;
* grouped, x <[M, D]> sorted by expert with <int32>[E] group sizes: the
  configured grouped matmul (`moe_jax.moe.grouped_matmul`), each row
  multiplied by its own expert's weights.
"""

from __future__ import annotations

import enum
import functools
from typing import Callable, Optional

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from moe_jax import axes
from moe_jax.moe.grouped_matmul import GroupedMatmulFn

Array = jax.Array
# {name: <[E, D, F]> ("wi", "wi_0", "wi_1") or <[E, F, D]> ("wo")}.
Weights = dict[str, Array]


class Activation(str, enum.Enum):
  """Expert MLP activation.

  RELU: relu(x wi) wo (Switch Transformer).
  GELU: gelu(x wi) wo.
  GATED_GELU: (gelu(x wi_0) * (x wi_1)) wo (T5 v1.1, ST-MoE).
  SWIGLU: (silu(x wi_0) * (x wi_1)) wo (Mixtral).
  """
  RELU = "relu"
  GELU = "gelu"
  GATED_GELU = "gated_gelu"
  SWIGLU = "swiglu"

  @property
  def is_gated(self) -> bool:
    return self in (Activation.GATED_GELU, Activation.SWIGLU)

  @property
  def weight_names(self) -> tuple[str, ...]:
    """Names of the weights `mlp` asks for; "wo" is the one out of F."""
    return ("wi_0", "wi_1", "wo") if self.is_gated else ("wi", "wo")

  @property
  def fn(self) -> Callable[[Array], Array]:
    return {
        Activation.RELU: jax.nn.relu,
        Activation.GELU: jax.nn.gelu,
        Activation.GATED_GELU: jax.nn.gelu,
        Activation.SWIGLU: jax.nn.silu,
    }[self]


def expert_kernel_init() -> nn.initializers.Initializer:
  """T5-style fan-in scaling, per expert (the expert axis is a batch axis)."""
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
      batch_axis=(0,))


class Experts(nn.Module):
  """The weights of E independent MLPs D -> F -> D, no biases.

  Attributes:
    num_experts: E.
    hidden_dim: F.
    activation: see `Activation` (which weights exist).
    dtype: dtype the weights are returned in (the matmul dtype).
    param_dtype: dtype of the stored weights.
  """
  num_experts: int
  hidden_dim: int
  activation: Activation = Activation.GATED_GELU
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = expert_kernel_init()

  @nn.compact
  def __call__(self, width: int) -> Weights:
    """The weights for model width D = `width` (see `Weights`)."""
    def weight(name: str) -> Array:
      shape, logical = (
          ((self.num_experts, self.hidden_dim, width), axes.EXPERT_WO)
          if name == "wo" else
          ((self.num_experts, width, self.hidden_dim), axes.EXPERT_WI))
      init = nn.with_logical_partitioning(self.kernel_init, logical)
      return jnp.asarray(self.param(name, init, shape, self.param_dtype),
                         self.dtype)
    return {name: weight(name)
            for name in Activation(self.activation).weight_names}


def _identity(h: Array) -> Array:
  return h


def batched_matmul(x: Array, w: Array) -> Array:
  """<[E, T, I]> x <[E, I, O]> -> <[E, T, O]>, one matmul per expert."""
  return jnp.einsum("etp,epq->etq", x, w)


def apply_experts(x: Array, weights: Weights, activation: Activation,
                  matmul: Callable[[Array, Array], Array],
                  hidden_dropout: Callable[[Array], Array] = _identity
                  ) -> Array:
  """The expert MLPs on x (cast to the weights' dtype), rows meeting the
  weights through `matmul`."""
  x = x.astype(weights["wo"].dtype)
  return mlp(x, activation, lambda name, _: weights[name], matmul,
             hidden_dropout)


@struct.dataclass
class ExpertFns:
  """The experts bound to their weights, in the two layouts of the paths.

  A pytree whose leaves are the weights (the functions are static), so
  `moe_jax.moe.expert_parallel` can split the weights over devices and
  rebind the functions around its collectives.

  Attributes:
    weights: see `Weights`.
    batched_fn: (weights, x <[E, T, D]>) -> <[E, T, D]>.
    grouped_fn: (weights, rows <[M, D]> sorted by expert, group sizes
      <int32>[E]) -> <[M, D]>.
    buffer_axes: logical axes the batched input is constrained to, or None
      (inside `jax.shard_map`, where the mesh axes are manual).
  """
  weights: Weights
  batched_fn: Callable[[Weights, Array], Array] = struct.field(
      pytree_node=False)
  grouped_fn: Callable[[Weights, Array, Array], Array] = struct.field(
      pytree_node=False)
  buffer_axes: Optional[tuple[str, ...]] = struct.field(pytree_node=False,
                                                        default=None)

  def batched(self, x: Array) -> Array:
    """<[E, T, D]> -> <[E, T, D]>."""
    if self.buffer_axes is not None:
      x = nn.with_logical_constraint(x, self.buffer_axes)
    return self.batched_fn(self.weights, x)

  def grouped(self, rows: Array, group_sizes: Array) -> Array:
    """<[M, D]> sorted by expert, <int32>[E] -> <[M, D]>."""
    return self.grouped_fn(self.weights, rows, group_sizes)


def expert_fns(weights: Weights, activation: Activation,
               grouped_matmul: GroupedMatmulFn,
               hidden_dropout: Callable[[Array], Array] = _identity
               ) -> ExpertFns:
  """The experts on one program (XLA's SPMD partitioner shards them); the
  expert buffers are constrained to `axes.EXPERT_BUFFERS`."""
  apply = functools.partial(apply_experts, activation=activation,
                            hidden_dropout=hidden_dropout)
  return ExpertFns(
      weights,
      batched_fn=lambda w, x: apply(x, w, matmul=batched_matmul),
      grouped_fn=lambda w, rows, sizes: apply(
          rows, w, matmul=functools.partial(grouped_matmul,
                                            group_sizes=sizes)),
      buffer_axes=axes.EXPERT_BUFFERS)


def mlp(x: Array, activation: Activation,
        weight: Callable[[str, bool], Array],
        matmul: Callable[[Array, Array], Array],
        hidden_dropout: Callable[[Array], Array]) -> Array:
  """The FFN shared by experts and dense layers: x -> act(x wi) -> wo.

  Args:
    x: input rows.
    activation: `Activation`; gated ones use two input matrices wi_0, wi_1.
    weight: weight(name, into_hidden) returns the matrix called `name`
      ("wi", "wi_0", "wi_1" into the hidden layer, "wo" out of it).
    matmul: how rows meet a weight (plain, batched per expert, or grouped).
    hidden_dropout: applied to the hidden activations.
  """
  if activation.is_gated:
    hidden = activation.fn(matmul(x, weight("wi_0", True)))
    hidden = hidden * matmul(x, weight("wi_1", True))
  else:
    hidden = activation.fn(matmul(x, weight("wi", True)))
  return matmul(hidden_dropout(hidden), weight("wo", False))
