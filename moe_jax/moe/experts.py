"""Stacked expert MLPs: every weight has a leading expert axis.

Dimension names: E experts, D model width, F expert hidden width (d_ff),
T tokens per expert (capacity paths), M sorted rows (dropless path).

`Experts` only creates the weights; `apply_experts` is the pure MLP over
them (`mlp`, which `DenseFFN`, the dense layer of the models and of the
MoE layer's shared experts, also runs), `ExpertDropout` the dropout on its
hidden activations, and `ExpertFns` binds them to the layouts the dispatch
paths use:
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


@struct.dataclass
class ExpertDropout:
  """Dropout on the experts' hidden activations <[..., F]>: each element is
  kept with probability 1 - rate and scaled by 1 / (1 - rate), as
  `flax.linen.Dropout`. A pytree whose leaf is the key, so it can enter
  `jax.shard_map` and take one key per device (`for_device`).

  Attributes:
    key: PRNG key; None: no dropout (evaluation, or rate 0).
    rate: the drop probability, in [0, 1).
  """
  key: Optional[Array] = None
  rate: float = struct.field(pytree_node=False, default=0.0)

  def __call__(self, h: Array) -> Array:
    if self.key is None or self.rate == 0:
      return h
    keep = jax.random.bernoulli(self.key, 1.0 - self.rate, h.shape)
    return jax.lax.select(keep, h / (1.0 - self.rate), jnp.zeros_like(h))

  def for_device(self, index: Array) -> ExpertDropout:
    """The dropout of the device at linear mesh position `index`: its key
    folded with `index`, so devices draw independent masks."""
    if self.key is None:
      return self
    return self.replace(key=jax.random.fold_in(self.key, index))


def batched_matmul(x: Array, w: Array) -> Array:
  """<[E, T, I]> x <[E, I, O]> -> <[E, T, O]>, one matmul per expert."""
  return jnp.einsum("etp,epq->etq", x, w)


def apply_experts(x: Array, weights: Weights, activation: Activation,
                  matmul: Callable[[Array, Array], Array],
                  hidden_dropout: ExpertDropout = ExpertDropout()
                  ) -> Array:
  """The expert MLPs on x (cast to the weights' dtype), rows meeting the
  weights through `matmul`."""
  x = x.astype(weights["wo"].dtype)
  return mlp(x, activation, lambda name, _: weights[name], matmul,
             hidden_dropout)


@struct.dataclass
class ExpertFns:
  """The experts bound to their weights, in the two layouts of the paths.

  A pytree whose leaves are the weights and the dropout key (the functions
  are static), so `moe_jax.moe.expert_parallel` can split the weights over
  devices, give each device its own dropout key and rebind the functions
  around its collectives.

  Attributes:
    weights: see `Weights`.
    batched_fn: (weights, x <[E, T, D]>, dropout) -> <[E, T, D]>.
    grouped_fn: (weights, rows <[M, D]> sorted by expert, group sizes
      <int32>[E], dropout) -> <[M, D]>.
    buffer_axes: logical axes the batched input is constrained to, or None
      (inside `jax.shard_map`, where the mesh axes are manual).
    dropout: the `ExpertDropout` of the hidden activations.
  """
  weights: Weights
  batched_fn: Callable[[Weights, Array, ExpertDropout], Array] = (
      struct.field(pytree_node=False))
  grouped_fn: Callable[[Weights, Array, Array, ExpertDropout], Array] = (
      struct.field(pytree_node=False))
  buffer_axes: Optional[tuple[str, ...]] = struct.field(pytree_node=False,
                                                        default=None)
  dropout: ExpertDropout = ExpertDropout()

  def batched(self, x: Array) -> Array:
    """<[E, T, D]> -> <[E, T, D]>."""
    if self.buffer_axes is not None:
      x = nn.with_logical_constraint(x, self.buffer_axes)
    return self.batched_fn(self.weights, x, self.dropout)

  def grouped(self, rows: Array, group_sizes: Array) -> Array:
    """<[M, D]> sorted by expert, <int32>[E] -> <[M, D]>."""
    return self.grouped_fn(self.weights, rows, group_sizes, self.dropout)


def expert_fns(weights: Weights, activation: Activation,
               grouped_matmul: GroupedMatmulFn,
               dropout: ExpertDropout = ExpertDropout()) -> ExpertFns:
  """The experts on one program (XLA's SPMD partitioner shards them); the
  expert buffers are constrained to `axes.EXPERT_BUFFERS`."""
  apply = functools.partial(apply_experts, activation=activation)
  return ExpertFns(
      weights,
      batched_fn=lambda w, x, drop: apply(x, w, matmul=batched_matmul,
                                          hidden_dropout=drop),
      grouped_fn=lambda w, rows, sizes, drop: apply(
          rows, w, matmul=functools.partial(grouped_matmul,
                                            group_sizes=sizes),
          hidden_dropout=drop),
      buffer_axes=axes.EXPERT_BUFFERS, dropout=dropout)


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


class DenseFFN(nn.Module):
  """Dense feed-forward layer D -> F -> D (same activations as the experts)."""
  hidden_dim: int
  activation: Activation
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    width = x.shape[-1]
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

    def weight(name: str, into_hidden: bool) -> Array:
      shape, logical = (((width, self.hidden_dim), ("embed", "mlp")) if
                     into_hidden else
                     ((self.hidden_dim, width), ("mlp", "embed")))
      w = self.param(name, nn.with_logical_partitioning(init, logical), shape,
                     jnp.float32)
      return jnp.asarray(w, self.dtype)

    dropout = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))
    return mlp(x.astype(self.dtype), Activation(self.activation), weight,
               jnp.matmul, lambda h: dropout(h, deterministic=deterministic))
