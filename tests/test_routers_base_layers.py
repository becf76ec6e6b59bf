"""BASE layers: auction matches scipy's optimum; training loads exactly equal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from moe_jax.moe.routers.base_layers import (BaseLayerRouter, auction_assignment,
                                             balanced_assignment)
from tests.layer_helpers import assert_paths_agree, router_layer

NUM_EXPERTS = 4
auction = jax.jit(auction_assignment, static_argnames=("eps_final",))


def optimum(scores):
  rows, cols = linear_sum_assignment(scores, maximize=True)
  return scores[rows, cols].sum()


@pytest.mark.parametrize("seed", range(4))
def test_integer_scores_reach_the_exact_optimum(seed):
  scores = np.random.default_rng(seed).integers(0, 20, (8, 8)).astype(float)
  cols = np.asarray(auction(jnp.asarray(scores), eps_final=1.0 / 9))
  assert sorted(cols) == list(range(8))  # a permutation
  assert scores[np.arange(8), cols].sum() == optimum(scores)


@pytest.mark.parametrize("seed", range(4))
def test_real_scores_within_n_eps_of_the_optimum(seed):
  scores = np.random.default_rng(10 + seed).normal(size=(12, 12))
  eps = 1e-4
  cols = np.asarray(auction(jnp.asarray(scores, jnp.float32), eps_final=eps))
  assert sorted(cols) == list(range(12))
  total = scores[np.arange(12), cols].sum()
  assert optimum(scores) - total <= 12 * eps + 1e-5


def test_balanced_assignment_is_the_optimal_balanced_one():
  logits = np.random.default_rng(3).normal(size=(2, 8, NUM_EXPERTS))
  expert = np.asarray(jax.jit(balanced_assignment)(jnp.asarray(
      logits, jnp.float32)))
  for g in range(2):
    np.testing.assert_array_equal(np.bincount(expert[g]), 2)
    slots = np.repeat(logits[g], 2, axis=-1)
    got = logits[g, np.arange(8), expert[g]].sum()
    assert optimum(slots) - got <= 8 * 1e-3 + 1e-5


def test_every_training_step_has_exactly_equal_loads():
  layer = router_layer(BaseLayerRouter(), "scatter", NUM_EXPERTS, factor=1.0)
  for seed in range(3):
    x = jax.random.normal(jax.random.PRNGKey(seed), (2, 16, 8)) + 2.0
    params = layer.init(jax.random.PRNGKey(seed), x, deterministic=True)
    _, stats = layer.apply(params, x, deterministic=False,
                           rngs={"dropout": jax.random.PRNGKey(0)})
    np.testing.assert_array_equal(stats.expert_load, 2 * 16 / NUM_EXPERTS)


def test_einsum_and_scatter_paths_agree():
  x = jax.random.normal(jax.random.PRNGKey(2), (1, 16, 8))
  for deterministic in (False, True):
    assert_paths_agree(BaseLayerRouter(), x, NUM_EXPERTS,
                       deterministic=deterministic, factor=1.0)
