"""Routing decisions: capacity order, expert choice, padding, noise, precision."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.moe import metric_names
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import SecondExpertPolicy, TokenChoiceRouter
from tests.layer_helpers import (apply, init, inputs, make_layer,
                                 route_one_group)


def test_first_choices_are_placed_before_second_choices():
  layer = make_layer("top2", "scatter", factor=0.5)
  x = inputs(length=16)
  params = init(layer, x)
  decision, capacity = route_one_group(layer, params, x)
  first = np.asarray(decision.expert_index[0, :, 0])
  second = np.asarray(decision.expert_index[0, :, 1])
  for e in range(4):
    wanted_first = (first == e).sum()
    got_second = np.asarray(decision.dispatched[0, :, 1])[second == e].sum()
    if wanted_first >= capacity:
      assert got_second == 0, "a second choice took a slot a first choice lost"


def test_expert_choice_fills_every_expert_exactly():
  layer = make_layer("expert_choice", "scatter", factor=1.0)
  x = inputs(length=16)
  params = init(layer, x)
  decision, capacity = route_one_group(layer, params, x)
  assert decision.token_index.shape == (1, 4, capacity)
  for e in range(4):
    chosen = np.asarray(decision.token_index[0, e])
    assert len(set(chosen.tolist())) == capacity
  assert bool(jnp.all(decision.dispatched))
  _, stats = apply(layer, params, x)
  np.testing.assert_allclose(stats.expert_load, [capacity] * 4)


def test_padding_tokens_are_never_routed():
  layer = make_layer("top2", "scatter", factor=8.0)
  x = inputs()
  mask = jnp.ones((2, 12)).at[0, 8:].set(0)
  params = init(layer, x)
  y, stats = apply(layer, params, x, token_mask=mask)
  np.testing.assert_array_equal(np.asarray(y[0, 8:]), 0.0)
  assert float(stats.expert_load.sum()) == 20 * 2  # 20 real tokens, k = 2
  # Real tokens are routed as without the padding tokens (same capacity).
  real = jnp.concatenate([x[0, :8], x[1]])[None]
  y_real, stats_real = apply(layer, params, real)
  np.testing.assert_allclose(jnp.concatenate([y[0, :8], y[1]]), y_real[0],
                             atol=1e-5)
  np.testing.assert_allclose(stats.auxiliary_loss, stats_real.auxiliary_loss,
                             rtol=1e-5)
  np.testing.assert_allclose(stats.router_z_loss, stats_real.router_z_loss,
                             rtol=1e-5)


def test_jitter_only_in_training():
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, activation="relu",
                   router=TokenChoiceRouter(jitter_noise=0.5))
  x = inputs()
  params = init(layer, x)
  run = lambda seed, det: layer.apply(params, x, deterministic=det,
                                      rngs={"dropout": jax.random.PRNGKey(seed)})
  np.testing.assert_array_equal(run(0, True)[0], run(1, True)[0])
  assert not np.allclose(run(0, False)[1].router_z_loss,
                         run(1, False)[1].router_z_loss)


def test_random_second_expert_policy():
  router = TokenChoiceRouter(num_selected_experts=2,
                             second_expert_policy=SecondExpertPolicy.RANDOM)
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8, router=router,
                   eval_capacity_factor=8.0, train_capacity_factor=8.0)
  x = inputs(batch=4, length=64)
  params = init(layer, x)
  decision, _ = route_one_group(layer, params, x, deterministic=False)
  dispatched = np.asarray(decision.dispatched[0])
  assert dispatched[:, 0].all(), "the first choice is never skipped"
  probs = np.asarray(jax.nn.softmax(x.reshape(-1, 8) @ nn.unbox(params)[
      "params"]["router"]["router_weights"]["kernel"]))
  top2 = -np.sort(-probs, axis=1)[:, :2]
  expected = np.minimum(1.0, top2[:, 1] / top2.sum(1) / 0.5).mean()
  assert abs(dispatched[:, 1].mean() - expected) < 0.1
  eval_decision, _ = route_one_group(layer, params, x, deterministic=True)
  assert bool(jnp.all(eval_decision.dispatched))


def test_bfloat16_activations_keep_a_float32_router():
  x = inputs()
  layer32 = make_layer("top2", "scatter", factor=8.0)
  layer16 = make_layer("top2", "scatter", factor=8.0, dtype=jnp.bfloat16)
  params = init(layer32, x)
  y32, stats32 = apply(layer32, params, x)
  (y16, stats16), state = layer16.apply(
      params, x.astype(jnp.bfloat16), deterministic=True,
      mutable=[metric_names.INTERMEDIATES])
  assert y16.dtype == jnp.bfloat16
  assert nn.unbox(params)["params"]["router"]["router_weights"][
      "kernel"].dtype == jnp.float32
  assert stats16.router_z_loss.dtype == jnp.float32
  # Routing decisions in float32 match exactly; only expert math is bf16.
  np.testing.assert_array_equal(stats16.expert_load, stats32.expert_load)
  np.testing.assert_allclose(stats16.router_z_loss, stats32.router_z_loss,
                             rtol=1e-2)
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.1,
                             rtol=0.05)
