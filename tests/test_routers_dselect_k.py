"""DSelect-k: smooth-step codes converge to exactly k experts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax.moe.routers.dselect_k import (DSelectKRouter, selector_distributions,
                                           smooth_step)
from tests.layer_helpers import assert_paths_agree

NUM_EXPERTS = 8


def test_smooth_step_and_distributions():
  t = jnp.array([-1.0, -0.5, 0.0, 0.5, 1.0])
  np.testing.assert_allclose(smooth_step(t, 1.0), [0, 0, 0.5, 1, 1])
  r = selector_distributions(jnp.array([[2.0, -2.0, 2.0], [0.0, 0.0, 0.0]]),
                             1.0)
  np.testing.assert_allclose(r[0], np.eye(NUM_EXPERTS)[0b101])
  np.testing.assert_allclose(r[1], np.full(NUM_EXPERTS, 1 / NUM_EXPERTS))


@pytest.mark.parametrize("per_example", [False, True])
def test_short_optimization_leaves_exactly_k_experts(per_example):
  k = 2
  router = DSelectKRouter(num_selected_experts=k, per_example=per_example,
                          entropy_weight=0.05)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 4))
  mask = jnp.ones((1, 8))
  call = lambda p: router.apply(p, x, mask, num_experts=NUM_EXPERTS,
                                capacity=None, deterministic=True)
  params = router.init(jax.random.PRNGKey(1), x, mask,
                       num_experts=NUM_EXPERTS, capacity=None,
                       deterministic=True)
  target = jnp.zeros(NUM_EXPERTS).at[jnp.array([1, 6])].set(0.5)
  start = np.asarray(call(params).router_probs)
  assert ((start > 0).sum(-1) > k).all()  # starts spread over more experts

  def loss_fn(p):
    out = call(p)
    return jnp.mean((out.router_probs - target) ** 2) + out.auxiliary_loss

  opt = optax.adam(0.05)
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    updates, s = opt.update(jax.grad(loss_fn)(p), s)
    return optax.apply_updates(p, updates), s

  for _ in range(300):
    params, state = step(params, state)
  q = np.asarray(call(params).router_probs)
  np.testing.assert_array_equal((q > 0).sum(-1), k)


def test_bad_num_experts_is_refused():
  with pytest.raises(ValueError, match="num_experts"):
    DSelectKRouter().validate(6)


@pytest.mark.parametrize("per_example", [False, True])
def test_einsum_and_scatter_paths_agree(per_example):
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 16, 8))
  assert_paths_agree(DSelectKRouter(per_example=per_example), x, NUM_EXPERTS)
