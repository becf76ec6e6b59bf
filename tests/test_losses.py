"""Routing losses: documented minima, formulas, padding, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import losses


def _uniform(groups=2, tokens=8, experts=4, k=1):
  probs = jnp.full((groups, tokens, experts), 1.0 / experts)
  # Token s picks experts s, s+1, ... (mod E): every expert equally often.
  picks = (jnp.arange(tokens)[:, None] + jnp.arange(k)[None]) % experts
  mask = jax.nn.one_hot(picks, experts).sum(1)
  return probs, jnp.broadcast_to(mask, probs.shape), jnp.ones((groups, tokens))


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_minimum_is_k_for_uniform_routing(k):
  probs, mask, tokens = _uniform(k=k)
  np.testing.assert_allclose(losses.load_balancing_loss(probs, mask, tokens),
                             float(k), rtol=1e-6)


def test_load_balancing_rises_with_imbalance():
  _, _, tokens = _uniform()
  values = []
  for skew in [0.0, 0.5, 1.0, 3.0]:
    logits = jnp.array([skew, 0.0, 0.0, 0.0])
    probs = jnp.broadcast_to(jax.nn.softmax(logits), (2, 8, 4))
    # The favoured expert takes a growing share of the tokens.
    share = int(round(2 + 6 * skew / 3.0))
    picks = jnp.where(jnp.arange(8) < share, 0, 1 + jnp.arange(8) % 3)
    mask = jnp.broadcast_to(jax.nn.one_hot(picks, 4), (2, 8, 4))
    values.append(float(losses.load_balancing_loss(probs, mask, tokens)))
  assert values == sorted(values) and values[-1] > values[0] + 0.5


def test_load_balancing_ignores_padding():
  probs, mask, tokens = _uniform(tokens=8)
  skewed = probs.at[:, 6:].set(jnp.array([1.0, 0, 0, 0]))
  skewed_mask = mask.at[:, 6:].set(jnp.array([1.0, 0, 0, 0]))
  padded = tokens.at[:, 6:].set(0)
  np.testing.assert_allclose(
      losses.load_balancing_loss(skewed, skewed_mask, padded),
      losses.load_balancing_loss(probs[:, :6], mask[:, :6], tokens[:, :6]))


def test_router_z_loss_formula():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 4)) * 3
  mask = jnp.ones((2, 5)).at[1, 3:].set(0)
  log_z = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
  want = (log_z ** 2 * np.asarray(mask)).sum() / np.asarray(mask).sum()
  np.testing.assert_allclose(losses.router_z_loss(logits, mask), want,
                             rtol=1e-5)


def test_router_z_loss_gradient_shrinks_logits():
  logits = jnp.array([[[2.0, 1.0, -1.0]]])
  grad = jax.grad(lambda l: losses.router_z_loss(l, jnp.ones((1, 1))))(logits)
  # d/dl log_z^2 = 2 log_z softmax(l): positive when log_z > 0.
  np.testing.assert_allclose(
      grad, 2 * jax.nn.logsumexp(logits) * jax.nn.softmax(logits), rtol=1e-5)


def test_coefficient_of_variation_and_importance():
  np.testing.assert_allclose(
      losses.coefficient_of_variation_squared(jnp.array([1.0, 1.0, 1.0])), 0.0)
  values = jnp.array([1.0, 2.0, 3.0, 6.0])
  np.testing.assert_allclose(losses.coefficient_of_variation_squared(values),
                             np.var([1, 2, 3, 6]) / 3.0 ** 2, rtol=1e-6)
  gates = jnp.zeros((1, 4, 2)).at[0, :, 0].set(1.0)
  np.testing.assert_allclose(losses.importance_loss(gates, jnp.ones((1, 4))),
                             1.0, rtol=1e-6)
