"""Stacked experts: both layouts, every activation, per-expert weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe.experts import Activation, Experts


@pytest.mark.parametrize("activation", list(Activation))
def test_batched_and_grouped_layouts_agree(activation):
  experts = Experts(num_experts=3, hidden_dim=6, activation=activation)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5))
  params = experts.init(jax.random.PRNGKey(1), x, deterministic=True)
  batched = experts.apply(params, x, deterministic=True)
  grouped = experts.apply(params, x.reshape(12, 5),
                          jnp.array([4, 4, 4], jnp.int32), deterministic=True)
  np.testing.assert_allclose(batched.reshape(12, 5), grouped, atol=1e-5)
  # Expert e applies only its own weights.
  p = jax.tree.map(np.asarray, params["params"])
  p = {k: v.value if hasattr(v, "value") else v for k, v in p.items()}
  act = activation.fn
  e, row = 2, x[2, 1]
  if activation.is_gated:
    hidden = act(row @ p["wi_0"][e]) * (row @ p["wi_1"][e])
  else:
    hidden = act(row @ p["wi"][e])
  np.testing.assert_allclose(batched[2, 1], hidden @ p["wo"][e], atol=1e-5)


def test_uneven_groups():
  experts = Experts(num_experts=3, hidden_dim=4, activation="relu")
  rows = jax.random.normal(jax.random.PRNGKey(0), (7, 5))
  params = experts.init(jax.random.PRNGKey(1), rows, jnp.array([2, 0, 5]),
                        deterministic=True)
  out = experts.apply(params, rows, jnp.array([2, 0, 5]), deterministic=True)
  w = jax.tree.map(lambda b: b.value, params["params"],
                   is_leaf=lambda b: hasattr(b, "value"))
  want = jnp.concatenate([
      jax.nn.relu(rows[:2] @ w["wi"][0]) @ w["wo"][0],
      jax.nn.relu(rows[2:] @ w["wi"][2]) @ w["wo"][2]])
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_expert_dropout_only_in_training():
  experts = Experts(num_experts=2, hidden_dim=64, activation="relu",
                    dropout_rate=0.5)
  x = jnp.ones((2, 3, 4))
  params = experts.init(jax.random.PRNGKey(0), x, deterministic=True)
  det = experts.apply(params, x, deterministic=True)
  train = experts.apply(params, x, deterministic=False,
                        rngs={"dropout": jax.random.PRNGKey(1)})
  assert not np.allclose(det, train)
