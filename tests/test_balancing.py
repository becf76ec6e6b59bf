"""Balancing options: aux-loss-free selection bias, shared experts,
fine-grained experts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import flops, gin_utils
from moe_jax.models import configured_model_config
from moe_jax.moe.experts import DenseFFN
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.metric_names import ROUTER_STATE
from moe_jax.moe.routers import AuxLossFreeRouter, TokenChoiceRouter
from moe_jax.moe.routers.aux_free import (SELECTION_BIAS,
                                          update_selection_bias)
from tests.layer_helpers import inputs

NUM_EXPERTS = 4


def aux_free_layer(rate, k=1):
  return MoeLayer(router=AuxLossFreeRouter(num_selected_experts=k,
                                           bias_update_rate=rate),
                  num_experts=NUM_EXPERTS, expert_hidden_dim=8,
                  dispatch="dropless", activation="relu")


def skewed_variables(layer, x):
  """Init variables whose router sends nearly every token to expert 0."""
  variables = nn.unbox(layer.init(jax.random.PRNGKey(0), x,
                                  deterministic=True))
  kernel = variables["params"]["router"]["router_weights"]["kernel"]
  skew = kernel.at[:, 0].add(0.3)
  params = {**variables["params"],
            "router": {"router_weights": {"kernel": skew}}}
  return {"params": params, ROUTER_STATE: variables[ROUTER_STATE]}


def skewed_inputs():
  return inputs(batch=4, length=16, width=8) + 1.0


def train_call(layer):
  """A jitted training call: variables, x -> (stats, new router state)."""
  @jax.jit
  def call(variables, x):
    (_, stats), state = layer.apply(variables, x, deterministic=False,
                                    mutable=[ROUTER_STATE],
                                    rngs={"dropout": jax.random.PRNGKey(0)})
    return stats, state[ROUTER_STATE]
  return call


def bias_of(state):
  return state["router"][SELECTION_BIAS]


def cv(load):
  return float(np.std(load) / np.mean(load))


def test_update_is_the_sign_rule():
  bias = jnp.array([0.0, 0.5, -0.5, 0.0])
  load = jnp.array([10.0, 2.0, 2.0, 2.0])  # mean 4
  np.testing.assert_allclose(update_selection_bias(bias, load, 0.1),
                             [-0.1, 0.6, -0.4, 0.1])


def test_bias_is_state_not_a_parameter_and_starts_at_zero():
  layer = aux_free_layer(1e-2)
  variables = layer.init(jax.random.PRNGKey(0), skewed_inputs(),
                         deterministic=True)
  assert SELECTION_BIAS not in str(jax.tree_util.tree_structure(
      variables["params"]))
  np.testing.assert_array_equal(bias_of(variables[ROUTER_STATE]),
                                np.zeros(NUM_EXPERTS))


def test_updates_balance_a_skewed_router():
  """Applying the per-call update in a loop evens out a router that first
  sends nearly everything to one expert; router weights never change."""
  layer, x = aux_free_layer(3e-3), skewed_inputs()
  variables = skewed_variables(layer, x)
  call = train_call(layer)
  stats, _ = call(variables, x)
  first = np.asarray(stats.expert_load)
  assert first[0] > 0.8 * first.sum(), first
  loads = []
  for _ in range(300):
    stats, state = call(variables, x)
    variables = {**variables, ROUTER_STATE: state}
    loads.append(np.asarray(stats.expert_load))
  # The sign rule hovers around balance; its time average is balanced.
  last = np.mean(loads[-50:], axis=0)
  assert cv(first) > 1.0 and cv(last) < 0.1, (first, last)
  assert loads[-1].sum() == first.sum()  # 1 choice a token, dropless
  bias = np.asarray(bias_of(variables[ROUTER_STATE]))
  assert bias[0] < 0 and np.all(bias[1:] > bias[0])


def test_bias_moves_selection_but_not_gates_and_eval_does_not_update():
  layer, x = aux_free_layer(1e-2, k=2), skewed_inputs()
  variables = skewed_variables(layer, x)
  bias = jnp.array([-1.0, 0.0, 1.0, 0.0])  # forbids 0, forces 2
  variables = {**variables, ROUTER_STATE: {"router": {SELECTION_BIAS: bias}}}
  tokens = x.reshape(1, -1, x.shape[-1])
  mask = jnp.ones(tokens.shape[:2])
  router_vars = {"params": variables["params"]["router"],
                 ROUTER_STATE: variables[ROUTER_STATE]["router"]}
  out, state = layer.router.apply(
      router_vars, tokens, mask, num_experts=NUM_EXPERTS, capacity=None,
      deterministic=True, mutable=[ROUTER_STATE])
  np.testing.assert_array_equal(state[ROUTER_STATE][SELECTION_BIAS], bias)
  index = np.asarray(out.decision.expert_index)
  assert not np.any(index == 0) and np.all(np.any(index == 2, axis=-1))
  probs = np.asarray(out.router_probs)
  np.testing.assert_allclose(np.asarray(out.decision.gates),
                             np.take_along_axis(probs, index, axis=-1),
                             rtol=1e-6)


def test_missing_state_names_the_collection():
  layer, x = aux_free_layer(1e-2), skewed_inputs()
  variables = skewed_variables(layer, x)
  with pytest.raises(ValueError, match=ROUTER_STATE):
    layer.apply({"params": variables["params"]}, x, deterministic=True)


def test_shared_experts_add_a_dense_ffn_to_the_routed_output():
  """Output = routed-only output + a dense FFN with the shared weights; the
  routing statistics are those of the routed experts alone; padding gets 0."""
  routed = MoeLayer(router=TokenChoiceRouter(num_selected_experts=2),
                    num_experts=NUM_EXPERTS, expert_hidden_dim=8,
                    activation="gated_gelu", train_capacity_factor=1.0,
                    eval_capacity_factor=1.0, min_expert_capacity=1)
  shared = routed.clone(num_shared_experts=2, shared_expert_hidden_dim=6)
  x = inputs(batch=2, length=12, width=8)
  mask = jnp.ones((2, 12)).at[1, 9:].set(0.0)
  params = nn.unbox(shared.init(jax.random.PRNGKey(0), x,
                                deterministic=True))["params"]
  ffn_params = params["shared_experts"]
  assert ffn_params["wi_0"].shape == (8, 12)  # 2 shared experts of width 6
  y, stats = shared.apply({"params": params}, x, mask, deterministic=True)
  routed_params = {k: v for k, v in params.items() if k != "shared_experts"}
  y_routed, stats_routed = routed.apply({"params": routed_params}, x, mask,
                                        deterministic=True)
  dense = DenseFFN(hidden_dim=12, activation="gated_gelu").apply(
      {"params": ffn_params}, x, deterministic=True)
  np.testing.assert_allclose(y, y_routed + dense * mask[..., None],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y[1, 9:], 0.0)
  assert np.abs(np.asarray(dense[1, 9:])).sum() > 0
  np.testing.assert_array_equal(stats.expert_load, stats_routed.expert_load)


@pytest.mark.parametrize("knob", ["num_shared_experts", "expert_segments",
                                  "shared_expert_hidden_dim"])
def test_balancing_knobs_are_checked(knob):
  with pytest.raises(ValueError, match=knob):
    MoeLayer(router=TokenChoiceRouter(), expert_hidden_dim=8,
             **{knob: -1})


def _counts(*files):
  gin_utils.parse(["gin/models/t5_1_1_tiny_moe.gin", *files])
  config = configured_model_config()
  return config, flops.count(config, input_length=16, target_length=8)


def test_fine_grained_preset_matches_top1_expert_flops():
  """32 experts of width mlp_dim / 4, top-4: the expert parameters and the
  active FLOPs of 8 full-width experts top-1, except the wider router."""
  coarse_config, coarse = _counts("gin/routing/switch_top1.gin")
  fine_config, fine = _counts("gin/routing/fine_grained.gin")
  layer = fine_config.moe_layer("encoder")
  assert (layer.num_experts, layer.router.num_selected_experts,
          layer.expert_hidden_dim) == (32, 4, fine_config.mlp_dim // 4)
  assert coarse_config.moe_layer("encoder").num_experts == 8
  assert (fine.params_by_part["experts"] ==
          coarse.params_by_part["experts"])
  router_extra = fine.router_params - coarse.router_params
  assert router_extra == 2 * fine_config.emb_dim * (32 - 8)  # 2 stacks
  # Each router weight is one multiply-add (2 FLOPs) per token.
  for stack in ("encoder", "decoder"):
    difference = (getattr(fine, f"{stack}_flops_per_token") -
                  getattr(coarse, f"{stack}_flops_per_token"))
    assert difference == pytest.approx(router_extra, rel=1e-9), stack
  assert (fine.active_params_per_token - coarse.active_params_per_token ==
          pytest.approx(router_extra))


def test_fine_grained_segments_must_divide_mlp_dim():
  gin_utils.parse(["gin/models/t5_1_1_tiny_moe.gin",
                   "gin/routing/fine_grained.gin"],
                  ["EXPERT_SEGMENTS = 5"])
  with pytest.raises(ValueError, match="expert_segments=5.*mlp_dim=64"):
    configured_model_config().moe_layer("encoder")
