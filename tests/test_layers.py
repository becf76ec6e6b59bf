"""MoeLayer: the three dispatch paths, the slow reference, capacity, metrics."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moe_jax import metric_names
from moe_jax.dispatch import Dispatch
from moe_jax.layers import MoeLayer
from moe_jax.routing import (ExpertChoiceRouter, SecondExpertPolicy,
                             TokenChoiceRouter)
from tests import moe_reference as ref

ROUTERS = {
    "top1": lambda: TokenChoiceRouter(num_selected_experts=1),
    "top2": lambda: TokenChoiceRouter(num_selected_experts=2),
    "top2_renorm_bpr": lambda: TokenChoiceRouter(
        num_selected_experts=2, renormalize_gates=True,
        batch_prioritized_routing=True),
    "expert_choice": ExpertChoiceRouter,
}


def make_layer(router="top2", dispatch="scatter", num_experts=4, factor=1.0,
               **kwargs):
  kwargs.setdefault("min_expert_capacity", 1)
  kwargs.setdefault("activation", "relu")
  return MoeLayer(num_experts=num_experts, expert_hidden_dim=16,
                  router=ROUTERS[router](), dispatch=dispatch,
                  train_capacity_factor=factor, eval_capacity_factor=factor,
                  **kwargs)


def inputs(batch=2, length=12, width=8, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, length, width))


def init(layer, x, seed=1):
  return layer.init(jax.random.PRNGKey(seed), x, deterministic=True)


def numpy_params(params):
  p = nn.unbox(params)["params"]
  return (np.asarray(p["router"]["router_weights"]["kernel"], np.float64),
          np.asarray(p["experts"]["wi"], np.float64),
          np.asarray(p["experts"]["wo"], np.float64))


def apply(layer, params, x, **kwargs):
  return layer.apply(params, x, deterministic=True, **kwargs)


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
  y, stats = apply(layer, params, x, padding_mask=jnp.asarray(mask))
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
    y, stats = layer.apply(params, x, padding_mask=mask, deterministic=True)
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
    y, stats = apply(layer, params, x, padding_mask=mask)
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
    y, stats = apply(layer, params, x, padding_mask=mask)
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


def _decision(layer, params, x, mask=None, deterministic=True):
  """The router's decision for x, one group (as the layer would route it)."""
  tokens = x.reshape(1, -1, x.shape[-1])
  token_mask = (jnp.ones(tokens.shape[:2]) if mask is None else
                mask.reshape(1, -1).astype(jnp.float32))
  capacity = layer.capacity(tokens.shape[1], deterministic)
  router_params = {"params": params["params"]["router"]}
  out = layer.router.apply(router_params, tokens, token_mask,
                           num_experts=layer.num_experts, capacity=capacity,
                           deterministic=deterministic,
                           rngs={"dropout": jax.random.PRNGKey(3)})
  return out.decision, capacity


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
  decision, capacity = _decision(layer, params, x)
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


def test_first_choices_are_placed_before_second_choices():
  layer = make_layer("top2", "scatter", factor=0.5)
  x = inputs(length=16)
  params = init(layer, x)
  decision, capacity = _decision(layer, params, x)
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
  decision, capacity = _decision(layer, params, x)
  assert decision.token_index.shape == (1, 4, capacity)
  for e in range(4):
    chosen = np.asarray(decision.token_index[0, e])
    assert len(set(chosen.tolist())) == capacity
  assert bool(jnp.all(decision.dispatched))
  _, stats = apply(layer, params, x)
  np.testing.assert_allclose(stats.expert_load, [capacity] * 4)


# ------------------------------------------------------------- padding


def test_padding_tokens_are_never_routed():
  layer = make_layer("top2", "scatter", factor=8.0)
  x = inputs()
  mask = jnp.ones((2, 12)).at[0, 8:].set(0)
  params = init(layer, x)
  y, stats = apply(layer, params, x, padding_mask=mask)
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
  decision, _ = _decision(layer, params, x, deterministic=False)
  dispatched = np.asarray(decision.dispatched[0])
  assert dispatched[:, 0].all(), "the first choice is never skipped"
  probs = np.asarray(jax.nn.softmax(x.reshape(-1, 8) @ nn.unbox(params)[
      "params"]["router"]["router_weights"]["kernel"]))
  top2 = -np.sort(-probs, axis=1)[:, :2]
  expected = np.minimum(1.0, top2[:, 1] / top2.sum(1) / 0.5).mean()
  assert abs(dispatched[:, 1].mean() - expected) < 0.1
  eval_decision, _ = _decision(layer, params, x, deterministic=True)
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
])
def test_bad_knobs_fail_at_construction(kwargs, knob):
  base = dict(num_experts=4, expert_hidden_dim=8, router=TokenChoiceRouter())
  with pytest.raises(ValueError, match=knob.replace("(", r"\(")):
    MoeLayer(**{**base, **kwargs})


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
  with pytest.raises(ValueError, match="padding_mask"):
    apply(make_layer(), params, x, padding_mask=jnp.ones((2, 3)))
