"""The opt-in `routing` capture of MoeLayer: it reproduces the layer's output
and loads, for token choice and expert choice, and is absent by default."""

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import metric_names
from tests import moe_reference as ref
from tests.test_layers import init, inputs, make_layer, numpy_params


@pytest.mark.parametrize("router", ["top2", "expert_choice"])
@pytest.mark.parametrize("dispatch", ["scatter", "einsum"])
def test_capture_reproduces_output_and_load(router, dispatch):
  layer = make_layer(router, dispatch, factor=0.25)
  x = inputs()
  mask = np.ones((2, 12), bool)
  mask[1, 8:] = False
  params = init(layer, x)
  (y, stats), state = layer.apply(params, x, token_mask=jnp.asarray(mask),
                                  deterministic=True,
                                  mutable=[metric_names.ROUTING])
  captured = {k: np.asarray(v[0])
              for k, v in state[metric_names.ROUTING].items()}
  assert set(captured) == set(metric_names.ROUTING_CAPTURE)
  kernel, wi, wo = numpy_params(params)
  x64 = np.asarray(x, np.float64).reshape(24, 8)
  probs = captured[metric_names.ROUTER_PROBS].reshape(24, 4)
  np.testing.assert_allclose(probs, ref.softmax(x64 @ kernel), atol=1e-6)
  np.testing.assert_array_equal(
      captured[metric_names.TOKEN_MASK].reshape(24), mask.reshape(24))

  weights = captured[metric_names.COMBINE_WEIGHTS].reshape(24, 4)
  taken = captured[metric_names.DISPATCH_MASK].reshape(24, 4)
  np.testing.assert_array_equal(weights[~taken], 0)
  assert not taken[~mask.reshape(24)].any()
  want = sum(weights[:, [e]] * ref.relu_expert(x64, wi[e], wo[e])
             for e in range(4))
  np.testing.assert_allclose(np.asarray(y).reshape(24, 8), want, atol=1e-5)
  np.testing.assert_array_equal(taken.sum(0), stats.expert_load)
  real = mask.reshape(24)
  # At most 12 slots for 20 real tokens: some tokens are dropped.
  assert 0 < stats.fraction_tokens_left_behind
  np.testing.assert_allclose(stats.fraction_tokens_left_behind,
                             (~taken.any(1) & real).sum() / real.sum(),
                             rtol=1e-6)


def test_nothing_captured_unless_requested():
  layer = make_layer("top2")
  x = inputs()
  params = init(layer, x)
  _, state = layer.apply(params, x, deterministic=True,
                         mutable=[metric_names.INTERMEDIATES])
  assert metric_names.ROUTING not in state
  assert "routing" not in params
