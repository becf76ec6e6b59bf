"""Stacked expert MLPs: every weight has a leading expert axis.

Dimension names: E experts, D model width, F expert hidden width (d_ff),
T tokens per expert (capacity paths), M sorted rows (dropless path).

One set of weights serves both layouts:
* batched, x <[E, T, D]>: one einsum over the leading expert axis;
* grouped, x <[M, D]> sorted by expert with <int32>[E] group sizes:
  `jax.lax.ragged_dot`, each row multiplied by its own expert's weights.
"""

from __future__ import annotations

import enum
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

WI_AXES = ("expert", "embed", "expert_mlp")
WO_AXES = ("expert", "expert_mlp", "embed")


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
  """E independent MLPs D -> F -> D, no biases.

  Attributes:
    num_experts: E.
    hidden_dim: F.
    activation: see `Activation`.
    dropout_rate: dropout on the hidden activations (expert dropout; ST-MoE
      fine-tunes with a higher rate here than in the dense layers).
    dtype: activation and matmul dtype.
    param_dtype: dtype of the stored weights.
  """
  num_experts: int
  hidden_dim: int
  activation: Activation = Activation.GATED_GELU
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = expert_kernel_init()

  def _weight(self, name: str, shape: tuple[int, ...], axes) -> Array:
    init = nn.with_logical_partitioning(self.kernel_init, axes)
    return jnp.asarray(self.param(name, init, shape, self.param_dtype),
                       self.dtype)

  @nn.compact
  def __call__(self, x: Array, group_sizes: Optional[Array] = None, *,
               deterministic: bool,
               exchange: Optional[Callable[[Array, dict], Array]] = None
               ) -> Array:
    """Applies the experts.

    Args:
      x: <[E, T, D]> tokens per expert, or <[M, D]> rows sorted by expert
        when `group_sizes` is given.
      group_sizes: <int32>[E] rows per expert (grouped layout), or None.
      deterministic: disables dropout.
      exchange: if given, replaces the local computation: it gets x and the
        weights {name: <[E, D, F]> or <[E, F, D]>} (see
        `Activation.weight_names`) and returns the output; used by
        `moe_jax.moe.expert_parallel`, which has no expert dropout.

    Returns:
      Same shape as x.
    """
    width = x.shape[-1]
    if group_sizes is None:
      matmul = lambda a, w: jnp.einsum("etd,edf->etf", a, w)
    else:
      matmul = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)

    def weight(name: str, into_hidden: bool) -> Array:
      if into_hidden:
        return self._weight(name, (self.num_experts, width, self.hidden_dim),
                            WI_AXES)
      return self._weight(name, (self.num_experts, self.hidden_dim, width),
                          WO_AXES)

    activation = Activation(self.activation)
    if exchange is not None:
      weights = {name: weight(name, name != "wo")
                 for name in activation.weight_names}
      return exchange(x.astype(self.dtype), weights)
    dropout = nn.Dropout(self.dropout_rate)
    return mlp(x.astype(self.dtype), activation, weight,
               matmul, lambda h: dropout(h, deterministic=deterministic))


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
