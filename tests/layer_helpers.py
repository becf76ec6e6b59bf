"""MoE layer builders shared by the layer, routing and router tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import ExpertChoiceRouter, TokenChoiceRouter

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


def route_one_group(layer, params, x, mask=None, deterministic=True):
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


def router_layer(router, dispatch, num_experts, factor=0.5):
  """A small MoeLayer around `router`: F = 8, relu, minimum capacity 1."""
  return MoeLayer(num_experts=num_experts, expert_hidden_dim=8, router=router,
                  dispatch=dispatch, train_capacity_factor=factor,
                  min_expert_capacity=1, activation="relu")


def assert_paths_agree(router, x, num_experts, token_ids=None,
                       deterministic=False, factor=0.5):
  """`router_layer` outputs <[B, L, D]> on the einsum and scatter paths are
  equal (same weights, same dropout RNG); returns the einsum one."""
  ids = {} if token_ids is None else {"token_ids": token_ids}
  outs = []
  for dispatch in ("einsum", "scatter"):
    layer = router_layer(router, dispatch, num_experts, factor)
    params = layer.init(jax.random.PRNGKey(0), x, deterministic=True, **ids)
    out, _ = layer.apply(params, x, deterministic=deterministic,
                         rngs={"dropout": jax.random.PRNGKey(7)}, **ids)
    outs.append(np.asarray(out))
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
  return outs[0]
