"""Noisy top-k gating: gradients of the load loss, balancing by training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax.moe.routers.noisy_top_k import NoisyTopKRouter, smooth_load
from tests.layer_helpers import assert_paths_agree

NUM_EXPERTS = 4


def skewed_tokens(seed=0, groups=2, tokens=32, width=8):
  """Tokens sharing a large common direction, so one expert attracts all."""
  x = jax.random.normal(jax.random.PRNGKey(seed), (groups, tokens, width))
  return x + 3.0 * jnp.ones((width,))


def route(router, params, x, deterministic, seed=0):
  return router.apply(params, x, jnp.ones(x.shape[:2]),
                      num_experts=NUM_EXPERTS, capacity=None,
                      deterministic=deterministic,
                      rngs={"dropout": jax.random.PRNGKey(seed)})


def skewed_params(router, x):
  params = router.init(jax.random.PRNGKey(0), x, jnp.ones(x.shape[:2]),
                       num_experts=NUM_EXPERTS, capacity=None,
                       deterministic=True)
  params = nn.unbox(params)
  kernel = params["params"]["gate_weights"]["kernel"]
  np.testing.assert_allclose(kernel, 0.0)  # W_g starts at zero.
  np.testing.assert_allclose(params["params"]["noise_weights"]["kernel"], 0.0)
  skew = jnp.zeros_like(kernel).at[:, 0].set(0.05)
  return {"params": {**params["params"],
                     "gate_weights": {"kernel": skew}}}


def training_load_imbalance(router, params, x):
  """max/mean expert load of noisy (training) routing, over 4 noise draws."""
  load = sum(route(router, params, x, False, 100 + seed).decision.expert_load(
      NUM_EXPERTS) for seed in range(4))
  return float(jnp.max(load) / jnp.mean(load))


def test_load_loss_has_gradient_wrt_noise_weights():
  # With K=1 every gate is exactly 1, so the importance term is constant and
  # the whole gradient comes from the smooth load estimate.
  router = NoisyTopKRouter(num_selected_experts=1)
  x = skewed_tokens()
  params = skewed_params(router, x)

  def load_loss(noise_kernel):
    p = {"params": {**params["params"],
                    "noise_weights": {"kernel": noise_kernel}}}
    out = route(router, p, x, False)
    return out.auxiliary_loss

  grad = jax.jit(jax.grad(load_loss))(params["params"]["noise_weights"]["kernel"])
  assert np.all(np.isfinite(grad))
  assert float(jnp.max(jnp.abs(grad))) > 1e-4


def test_smooth_load_matches_monte_carlo_estimate():
  # P(x, i) is the probability, over expert i's noise alone, that i is in
  # the top K; check against sampling that noise.
  key = jax.random.PRNGKey(3)
  clean = jax.random.normal(key, (1, 3, NUM_EXPERTS))
  std = jnp.full_like(clean, 0.7)
  noisy = clean + std * jax.random.normal(jax.random.PRNGKey(4), clean.shape)
  expected = smooth_load(clean, noisy, std, jnp.ones((1, 3)), 2)
  draws = jax.random.normal(jax.random.PRNGKey(5), (20000,) + clean.shape)
  hits = []
  for i in range(NUM_EXPERTS):
    resampled = jnp.broadcast_to(noisy, draws.shape).at[..., i].set(
        clean[..., i] + std[..., i] * draws[..., i])
    _, top = jax.lax.top_k(resampled, 2)
    hits.append(jnp.mean(jnp.any(top == i, axis=-1), axis=0).sum())
  np.testing.assert_allclose(expected, jnp.stack(hits), atol=0.05)


def test_training_on_the_balancing_loss_lowers_load_imbalance():
  router = NoisyTopKRouter(num_selected_experts=1)
  x = skewed_tokens()
  params = skewed_params(router, x)
  before = training_load_imbalance(router, params, x)
  assert before > 2.5  # Most tokens go to expert 0.

  optimizer = optax.adam(0.05)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, seed):
    loss_fn = lambda p: route(router, p, x, False, seed).auxiliary_loss
    grads = jax.grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state)
    return optax.apply_updates(params, updates), state

  for seed in range(40):
    params, state = step(params, state, seed)
  after = training_load_imbalance(router, params, x)
  assert after < 0.5 * before, (before, after)


def test_gates_are_softmax_over_the_top_k_and_zero_elsewhere():
  router = NoisyTopKRouter(num_selected_experts=2)
  x = skewed_tokens()
  params = skewed_params(router, x)
  out = route(router, params, x, False)
  probs = np.asarray(out.router_probs)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal((probs > 0).sum(-1), 2)


@pytest.mark.parametrize("k", [0, NUM_EXPERTS])
def test_bad_k_is_refused(k):
  with pytest.raises(ValueError, match="num_selected_experts"):
    NoisyTopKRouter(num_selected_experts=k).validate(NUM_EXPERTS)


def test_einsum_and_scatter_paths_agree():
  x = skewed_tokens(seed=1, groups=1, tokens=16)
  assert_paths_agree(NoisyTopKRouter(num_selected_experts=2), x, NUM_EXPERTS)
