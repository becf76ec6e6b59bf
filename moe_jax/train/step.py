"""Train state and the jitted train step.

Besides the parameters the state holds the model's non-gradient state
collections (`MODEL_STATE_COLLECTIONS`, e.g. the selection bias of
`AuxLossFreeRouter`): every training call makes them mutable and the step
stores what the model wrote; evaluation, inference and inspection apply
the model with them (`model_variables`). A model without such state has
an empty `model_state`. The step's metrics hold the selection biases after
the update (`selection_bias/per_layer`, <[R, E]>, in the layer order of
`expert_load/per_layer`).

The dropout RNG of step t is fold_in(seed key, t), so a resumed run draws the
same randomness as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import optax

from moe_jax.models.outputs import per_sparse_layer
from moe_jax.moe import metric_names
from moe_jax.moe.routers.aux_free import SELECTION_BIAS
from moe_jax.train.objective import LossConfig, training_loss

Array = jax.Array

# Batch features that are not model inputs (the loss reads them).
_NOT_INPUTS = ("decoder_loss_weights",)
# Variable collections that are model state but get no gradient.
MODEL_STATE_COLLECTIONS = (metric_names.ROUTER_STATE,)


@struct.dataclass
class TrainState:
  """Attributes:
    step: <int32>[] updates done.
    params: the parameters.
    opt_state: the optimizer state of `params`.
    model_state: collection name -> tree, of the `MODEL_STATE_COLLECTIONS`
      the model has ({} for most models).
  """
  step: Array
  params: Any
  opt_state: Any
  model_state: Any = dataclasses.field(default_factory=dict)


def model_variables(params: Any, model_state: Optional[Mapping] = None
                    ) -> dict[str, Any]:
  """The variables to apply the model with: `params` and `model_state`."""
  return {"params": params, **(model_state or {})}


def split_model_state(variables: Mapping[str, Any]) -> dict[str, Any]:
  """The `MODEL_STATE_COLLECTIONS` among `variables` (e.g. from init)."""
  return {k: variables[k] for k in MODEL_STATE_COLLECTIONS if k in variables}


def model_inputs(batch: Mapping[str, Array]) -> dict[str, Array]:
  """The features of `batch` the model takes as arguments (training,
  evaluation and inspection call it with these)."""
  return {k: v for k, v in batch.items() if k not in _NOT_INPUTS}


def init_state(model: nn.Module, optimizer: optax.GradientTransformation,
               batch: Mapping[str, Array], rng: Array) -> TrainState:
  """Fresh parameters (unboxed) and optimizer state for `model`."""
  variables = model.init(rng, **model_inputs(batch), enable_dropout=False)
  params = nn.unbox(variables["params"])
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params),
                    split_model_state(variables))


def loss_fn(model: nn.Module, loss_config: LossConfig, params, model_state,
            batch, dropout_rng: Array):
  """(loss, (metrics, updated model state)) of one training call."""
  output, new_state = model.apply(
      model_variables(params, model_state), **model_inputs(batch),
      enable_dropout=True, rngs={"dropout": dropout_rng},
      mutable=list(model_state))
  loss, metrics = training_loss(output, batch, loss_config)
  return loss, (metrics, {**model_state, **new_state})


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    loss_config: LossConfig, state_shardings: Any = None
                    ) -> Callable[[TrainState, Mapping[str, Array], Array],
                                  tuple[TrainState, dict[str, Array]]]:
  """A jitted (state, batch, dropout_key) -> (state, metrics) step; step t
  draws its dropout from `fold_in(dropout_key, t)`. The key is an argument,
  not a constant of the program, so runs with different seeds share one
  compiled step (and JAX's persistent compilation cache). With
  `state_shardings` the new state keeps the layout of the old one."""

  def step(state: TrainState, batch, dropout_key: Array):
    dropout_rng = jax.random.fold_in(dropout_key, state.step)
    (_, (metrics, model_state)), grads = jax.value_and_grad(
        lambda p: loss_fn(model, loss_config, p, state.model_state, batch,
                          dropout_rng), has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    if metric_names.ROUTER_STATE in model_state:
      metrics[f"{SELECTION_BIAS}/per_layer"] = per_sparse_layer(
          model_state[metric_names.ROUTER_STATE])
    return TrainState(state.step + 1, params, opt_state,
                      model_state), metrics

  if state_shardings is None:
    return jax.jit(step, donate_argnums=(0,))
  mesh = jax.tree.leaves(state_shardings)[0].mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=(0,),
                 out_shardings=(state_shardings, replicated))
