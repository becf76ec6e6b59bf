"""MoeLayer: the three dispatch paths, the slow reference, capacity, metrics."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moe_jax.moe import metric_names
from moe_jax.moe.dispatch import Dispatch
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import ExpertChoiceRouter, TokenChoiceRouter
from tests import moe_reference as ref
from tests.layer_helpers import (ROUTERS, apply, init, inputs, make_layer,
                                 numpy_params, route_one_group)


# ---------------------------------------------------------------- reference


@pytest.mark.parametrize("router", ["top1", "top2", "top2_renorm_bpr"])
@pytest.mark.parametrize("dispatch", ["einsum", "scatter"])
def test_token_choice_matches_slow_reference(router, dispatch):
  layer = make_layer(router, dispatch, factor=0.75)
  x = inputs()
  params = init(layer, x)
  y, stats = apply(layer, params, x)
  kernel, wi, wo = numpy_params(params)
  tc = layer.router
  cap = ref.capacity(24, 4, 0.75, 1, tc.num_selected_experts)
  want, dispatched = ref.token_choice(
      np.asarray(x, np.float64).reshape(24, 8), np.ones(24, bool), kernel, wi,
      wo, tc.num_selected_experts, cap, tc.renormalize_gates,
      tc.batch_prioritized_routing)
  np.testing.assert_allclose(np.asarray(y).reshape(24, 8), want, atol=1e-5)
  assert 0 < (~dispatched.any(1)).sum() or router != "top1"  # some drop
  np.testing.assert_allclose(stats.fraction_tokens_left_behind,
                             (~dispatched.any(1)).mean(), atol=1e-7)


@pytest.mark.parametrize("dispatch", ["einsum", "scatter"])
def test_expert_choice_matches_slow_reference(dispatch):
  layer = make_layer("expert_choice", dispatch, factor=1.0)
  x = inputs()
  mask = np.ones((2, 12), bool)
  mask[1, 9:] = False
  params = init(layer, x)
  y, stats = apply(layer, params, x, token_mask=jnp.asarray(mask))
  kernel, wi, wo = numpy_params(params)
  want, taken = ref.expert_choice(
      np.asarray(x, np.float64).reshape(24, 8), mask.reshape(24), kernel, wi,
      wo, ref.capacity(24, 4, 1.0, 1, 1))
  np.testing.assert_allclose(np.asarray(y).reshape(24, 8), want, atol=1e-5)
  real = mask.reshape(24)
  np.testing.assert_allclose(stats.fraction_tokens_left_behind,
                             ((taken == 0) & real).sum() / real.sum(),
                             atol=1e-7)


# ------------------------------------------------------- paths agree


def _loss_and_grads(layer, params, x, mask):
  def loss(params, x):
    y, stats = layer.apply(params, x, token_mask=mask, deterministic=True)
    return jnp.sum(jnp.sin(y)) + stats.auxiliary_loss + stats.router_z_loss
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("router", list(ROUTERS))
def test_paths_agree_on_outputs_drops_and_gradients(router):
  x = inputs(length=16)
  mask = jnp.ones((2, 16)).at[0, 13:].set(0)
  paths = ["einsum", "scatter"]
  results = {}
  for path in paths:
    layer = make_layer(router, path, factor=0.75)
    params = init(layer, x)
    y, stats = apply(layer, params, x, token_mask=mask)
    results[path] = (y, stats, _loss_and_grads(layer, params, x, mask))
  (y0, s0, (l0, g0)), (y1, s1, (l1, g1)) = results.values()
  np.testing.assert_allclose(y0, y1, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s0,
               s1)
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               nn.unbox(g0), nn.unbox(g1))
  assert float(jnp.abs(nn.unbox(g0[0])["params"]["router"]["router_weights"]
                       ["kernel"]).sum()) > 0, "no gradient reached the router"


@pytest.mark.parametrize("router", ["top1", "top2", "top2_renorm_bpr"])
def test_dropless_equals_capacity_paths_with_ample_capacity(router):
  x = inputs(length=16)
  mask = jnp.ones((2, 16)).at[1, 10:].set(0)
  outs = {}
  for path in ["einsum", "scatter", "dropless"]:
    # factor 8 with 4 experts: C = S, nothing can drop.
    layer = make_layer(router, path, factor=8.0)
    params = init(layer, x)
    y, stats = apply(layer, params, x, token_mask=mask)
    outs[path] = (y, stats.expert_load, _loss_and_grads(layer, params, x,
                                                        mask))
    assert float(stats.fraction_tokens_left_behind) == 0.0
  for path in ["einsum", "scatter"]:
    np.testing.assert_allclose(outs[path][0], outs["dropless"][0], atol=1e-5)
    np.testing.assert_allclose(outs[path][1], outs["dropless"][1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 nn.unbox(outs[path][2]), nn.unbox(outs["dropless"][2]))


def test_ample_capacity_output_is_plain_gated_sum():
  layer = make_layer("top2", "scatter", factor=8.0)
  x = inputs()
  params = init(layer, x)
  y, _ = apply(layer, params, x)
  kernel, wi, wo = numpy_params(params)
  xs = np.asarray(x, np.float64).reshape(24, 8)
  probs = ref.softmax(xs @ kernel)
  want = np.zeros_like(xs)
  for s in range(24):
    for e in np.argsort(-probs[s])[:2]:
      want[s] += probs[s, e] * ref.relu_expert(xs[s], wi[e], wo[e])
  np.testing.assert_allclose(np.asarray(y).reshape(24, 8), want, atol=1e-5)


# ------------------------------------------------------- capacity invariants


@settings(max_examples=6, deadline=None)
@given(num_experts=st.integers(2, 6), k=st.integers(1, 2),
       length=st.integers(2, 10), factor=st.sampled_from([0.3, 0.75, 1.0, 2.0]),
       seed=st.integers(0, 3))
def test_property_capacity_respected_and_paths_agree(num_experts, k, length,
                                                     factor, seed):
  k = min(k, num_experts)
  x = inputs(batch=2, length=length, seed=seed)
  results = []
  for path in ["einsum", "scatter"]:
    layer = MoeLayer(num_experts=num_experts, expert_hidden_dim=8,
                     router=TokenChoiceRouter(num_selected_experts=k),
                     dispatch=path, eval_capacity_factor=factor,
                     min_expert_capacity=1, activation="relu")
    params = init(layer, x)
    results.append(jax.jit(functools.partial(apply, layer))(params, x))
  np.testing.assert_allclose(results[0][0], results[1][0], atol=1e-5)
  decision, capacity = route_one_group(layer, params, x)
  load = np.zeros(num_experts, int)
  slots = set()
  for e, pos, d in zip(np.ravel(decision.expert_index),
                       np.ravel(decision.position),
                       np.ravel(decision.dispatched)):
    if d:
      load[e] += 1
      assert 0 <= pos < capacity and (e, pos) not in slots
      slots.add((e, pos))
  assert load.max() <= capacity
  np.testing.assert_allclose(results[0][1].expert_load, load)
  left = (~np.asarray(decision.dispatched).any(-1)).mean()
  np.testing.assert_allclose(results[0][1].fraction_tokens_left_behind, left,
                             atol=1e-6)


# ------------------------------------------------------------- padding


def test_pad_to_group_size_pads_the_last_group():
  x = inputs(batch=1, length=12)
  padded = make_layer("top1", "scatter", factor=8.0, max_group_size=8,
                      pad_to_group_size=True)
  params = init(padded, x)
  y, stats = apply(padded, params, x)
  assert y.shape == x.shape
  first = apply(padded, params, x[:, :8])[0]
  last = apply(padded, params, x[:, 8:])[0]
  np.testing.assert_allclose(y, jnp.concatenate([first, last], 1), atol=1e-6)
  assert float(stats.expert_load.sum()) == 12


# ------------------------------------------------------- metrics and modes


def test_sown_intermediates_equal_returned_stats():
  layer = make_layer("top2", "einsum", factor=0.75)
  x = inputs()
  params = init(layer, x)
  (_, stats), state = layer.apply(params, x, deterministic=True,
                                  mutable=[metric_names.INTERMEDIATES])
  sown = state[metric_names.INTERMEDIATES]
  assert set(sown) == set(metric_names.ALL)
  for name in metric_names.ALL:
    np.testing.assert_allclose(sown[name][0], getattr(stats, name))
  usage = float(stats.expert_load.sum()) / (4 * layer.capacity(24, True))
  np.testing.assert_allclose(stats.expert_usage, usage, rtol=1e-6)


def test_eval_and_train_capacity_factors_differ():
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8,
                   router=TokenChoiceRouter(), train_capacity_factor=1.0,
                   eval_capacity_factor=2.0, min_expert_capacity=1)
  assert layer.capacity(16, deterministic=False) == 4
  assert layer.capacity(16, deterministic=True) == 8


@pytest.mark.parametrize("path", ["einsum", "scatter", "dropless"])
def test_jit_and_grad_under_training_mode(path):
  layer = make_layer("top2", path, factor=1.25, expert_dropout_rate=0.1,
                     activation="gated_gelu")
  x = inputs()
  params = init(layer, x)

  @jax.jit
  def step(params):
    def loss(p):
      y, stats = layer.apply(p, x, deterministic=False,
                             rngs={"dropout": jax.random.PRNGKey(0)})
      return jnp.mean(y ** 2) + 0.01 * stats.auxiliary_loss
    return jax.grad(loss)(params)

  grads = nn.unbox(step(params))["params"]
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))
  assert float(jnp.abs(grads["experts"]["wi_0"]).sum()) > 0


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,knob", [
    (dict(router=TokenChoiceRouter(num_selected_experts=5)),
     "num_selected_experts=5"),
    (dict(train_capacity_factor=0.0), "train_capacity_factor=0.0"),
    (dict(eval_capacity_factor=-1.0), "eval_capacity_factor=-1.0"),
    (dict(router=ExpertChoiceRouter(), causal=True), "causal"),
    (dict(router=ExpertChoiceRouter(), dispatch="dropless"), "dropless"),
    (dict(dispatch="magic"), "dispatch='magic'"),
    (dict(activation="tanh"), "activation='tanh'"),
    (dict(num_experts=0), "num_experts=0"),
    (dict(router=TokenChoiceRouter(jitter_noise=1.5)), "jitter_noise=1.5"),
    (dict(expert_hidden_dim=0), "expert_hidden_dim=0"),
    (dict(param_dtype="float33"), "param_dtype='float33'"),
])
def test_bad_knobs_fail_at_construction(kwargs, knob):
  base = dict(num_experts=4, expert_hidden_dim=8, router=TokenChoiceRouter())
  with pytest.raises(ValueError, match=knob.replace("(", r"\(")):
    MoeLayer(**{**base, **kwargs})


def test_a_layer_on_its_own_needs_its_expert_width():
  layer = MoeLayer(num_experts=4, router=TokenChoiceRouter())
  with pytest.raises(ValueError, match="must set expert_hidden_dim"):
    init(layer, inputs())


def test_copies_check_their_knobs_again():
  layer = MoeLayer(num_experts=4, expert_hidden_dim=8,
                   router=ExpertChoiceRouter())
  with pytest.raises(ValueError, match="causal=True"):
    layer.clone(causal=True)


def test_expert_choice_allowed_in_causal_stack_when_asked():
  MoeLayer(num_experts=4, expert_hidden_dim=8, router=ExpertChoiceRouter(),
           causal=True, allow_expert_choice_in_causal=True)


def test_dropless_accepts_any_capacity_factor():
  MoeLayer(num_experts=4, expert_hidden_dim=8, router=TokenChoiceRouter(),
           dispatch=Dispatch.DROPLESS, train_capacity_factor=0.0)


def test_bad_shapes_fail_with_the_knob():
  layer = make_layer("top1", "scatter", max_group_size=5)
  x = inputs()
  with pytest.raises(ValueError, match="max_group_size=5"):
    init(layer, x)
  with pytest.raises(ValueError, match="rank 2"):
    init(make_layer(), x[0])
  params = init(make_layer(), x)
  with pytest.raises(ValueError, match="token_mask"):
    apply(make_layer(), params, x, token_mask=jnp.ones((2, 3)))
