"""Train state and the jitted train step.

The dropout RNG of step t is fold_in(seed key, t), so a resumed run draws the
same randomness as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import optax

from moe_jax.train.objective import LossConfig, training_loss

Array = jax.Array

# Batch features that are not model inputs (the loss reads them).
_NOT_INPUTS = ("decoder_loss_weights",)


@struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any


def model_inputs(batch: Mapping[str, Array]) -> dict[str, Array]:
  """The features of `batch` the model takes as arguments (training,
  evaluation and inspection call it with these)."""
  return {k: v for k, v in batch.items() if k not in _NOT_INPUTS}


def init_state(model: nn.Module, optimizer: optax.GradientTransformation,
               batch: Mapping[str, Array], rng: Array) -> TrainState:
  """Fresh parameters (unboxed) and optimizer state for `model`."""
  variables = model.init(rng, **model_inputs(batch), enable_dropout=False)
  params = nn.unbox(variables["params"])
  return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def loss_fn(model: nn.Module, loss_config: LossConfig, params, batch,
            dropout_rng: Array):
  output = model.apply({"params": params}, **model_inputs(batch),
                       enable_dropout=True, rngs={"dropout": dropout_rng})
  return training_loss(output, batch, loss_config)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    loss_config: LossConfig, seed_key: Array,
                    state_shardings: Any = None
                    ) -> Callable[[TrainState, Mapping[str, Array]],
                                  tuple[TrainState, dict[str, Array]]]:
  """A jitted (state, batch) -> (state, metrics) step; with
  `state_shardings` the new state keeps the layout of the old one."""

  def step(state: TrainState, batch):
    dropout_rng = jax.random.fold_in(seed_key, state.step)
    (_, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn(model, loss_config, p, batch, dropout_rng),
        has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return TrainState(state.step + 1, params, opt_state), metrics

  if state_shardings is None:
    return jax.jit(step, donate_argnums=(0,))
  mesh = jax.tree.leaves(state_shardings)[0].mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=(0,),
                 out_shardings=(state_shardings, replicated))
