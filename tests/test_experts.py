"""Stacked experts: both layouts, every activation, per-expert weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import grouped_matmul
from moe_jax.moe.experts import Activation, Experts, expert_fns
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter

RAGGED_DOT = grouped_matmul.resolve("ragged_dot")


def weights(num_experts, hidden_dim, activation, width=5):
  experts = Experts(num_experts=num_experts, hidden_dim=hidden_dim,
                    activation=activation)
  params = experts.init(jax.random.PRNGKey(1), width)
  return experts.apply(params, width), nn.unbox(params)["params"]


@pytest.mark.parametrize("activation", list(Activation))
def test_batched_and_grouped_layouts_agree(activation):
  w, params = weights(3, 6, activation)
  assert sorted(params) == sorted(activation.weight_names)
  fns = expert_fns(w, activation, RAGGED_DOT)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5))
  batched = fns.batched(x)
  grouped = fns.grouped(x.reshape(12, 5), jnp.array([4, 4, 4], jnp.int32))
  np.testing.assert_allclose(batched.reshape(12, 5), grouped, atol=1e-5)
  # Expert e applies only its own weights.
  p = jax.tree.map(np.asarray, params)
  act = activation.fn
  e, row = 2, x[2, 1]
  if activation.is_gated:
    hidden = act(row @ p["wi_0"][e]) * (row @ p["wi_1"][e])
  else:
    hidden = act(row @ p["wi"][e])
  np.testing.assert_allclose(batched[2, 1], hidden @ p["wo"][e], atol=1e-5)


def test_uneven_groups():
  w, _ = weights(3, 4, "relu")
  rows = jax.random.normal(jax.random.PRNGKey(0), (7, 5))
  out = expert_fns(w, Activation.RELU, RAGGED_DOT).grouped(
      rows, jnp.array([2, 0, 5]))
  want = jnp.concatenate([
      jax.nn.relu(rows[:2] @ w["wi"][0]) @ w["wo"][0],
      jax.nn.relu(rows[2:] @ w["wi"][2]) @ w["wo"][2]])
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_weights_take_dtype_and_param_dtype():
  experts = Experts(num_experts=2, hidden_dim=4, activation="relu",
                    dtype=jnp.bfloat16, param_dtype=jnp.float32)
  params = experts.init(jax.random.PRNGKey(0), 3)
  assert nn.unbox(params)["params"]["wi"].dtype == jnp.float32
  assert experts.apply(params, 3)["wi"].dtype == jnp.bfloat16


@pytest.mark.parametrize("dispatch", ["scatter", "dropless"])
def test_expert_dropout_only_in_training(dispatch):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
  apply = lambda layer, params, deterministic: layer.apply(
      params, x, deterministic=deterministic,
      rngs={"dropout": jax.random.PRNGKey(1)})[0]
  plain = MoeLayer(num_experts=2, expert_hidden_dim=64, dispatch=dispatch,
                   router=TokenChoiceRouter(), activation="relu")
  dropped = plain.clone(expert_dropout_rate=0.5)
  params = plain.init(jax.random.PRNGKey(2), x, deterministic=True)
  np.testing.assert_allclose(apply(dropped, params, True),
                             apply(plain, params, True), atol=1e-6)
  assert not np.allclose(apply(dropped, params, False),
                         apply(plain, params, False))
