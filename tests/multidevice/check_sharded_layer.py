"""Runs on 8 fake CPU devices: the MoE layer with sharded params equals one device.

Started by tests/test_partitioning.py with XLA_FLAGS set; exits non-zero on a
mismatch.
"""

import os

assert "xla_force_host_platform_device_count=8" in os.environ.get(
    "XLA_FLAGS", ""), "set XLA_FLAGS=--xla_force_host_platform_device_count=8"

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import partitioning
from moe_jax.moe.dispatch import Dispatch
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import ExpertChoiceRouter, TokenChoiceRouter

NUM_EXPERTS = 8
MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
ROUTERS = {
    "top1": (lambda: TokenChoiceRouter(num_selected_experts=1),
             Dispatch.SCATTER),
    "top2": (lambda: TokenChoiceRouter(num_selected_experts=2),
             Dispatch.EINSUM),
    "expert_choice": (ExpertChoiceRouter, Dispatch.SCATTER),
    "dropless": (lambda: TokenChoiceRouter(num_selected_experts=2),
                 Dispatch.DROPLESS),
}


def loss_fn(layer, params, x):
  y, stats = layer.apply({"params": params}, x, deterministic=True)
  return jnp.mean(y ** 2) + stats.auxiliary_loss + stats.router_z_loss


def main():
  assert jax.device_count() == 8, jax.device_count()
  x = jax.random.normal(jax.random.key(0), (8, 4, 8), jnp.float32)
  rules = partitioning.logical_axis_rules()
  for name, (router, dispatch) in ROUTERS.items():
    layer = MoeLayer(num_experts=NUM_EXPERTS, expert_hidden_dim=16,
                     router=router(), dispatch=dispatch, max_group_size=4)
    boxed = layer.init(jax.random.key(1), x, deterministic=True)["params"]
    params = nn.unbox(boxed)
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, x, layer=layer: loss_fn(layer, p, x)))
    want_loss, want_grads = grad_fn(params, x)
    for shape in MESHES:
      mesh = partitioning.make_mesh(*shape)
      shardings = nn.unbox(partitioning.shardings_for(boxed, mesh, rules))
      sharded = jax.device_put(params, shardings)
      kernels = [leaf for path, leaf in
                 jax.tree_util.tree_leaves_with_path(sharded)
                 if leaf.ndim == 3]
      for kernel in kernels:
        local = kernel.addressable_shards[0].data.shape
        assert local[0] == NUM_EXPERTS // shape[1], (name, shape, local)
      xs = jax.device_put(x, partitioning.replicated(mesh))
      with partitioning.axis_rules(mesh, rules):
        loss, grads = grad_fn(sharded, xs)
      np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{name} {shape}")
      jax.tree.map(lambda a, b: np.testing.assert_allclose(
          a, b, rtol=1e-4, atol=1e-6, err_msg=f"{name} {shape}"),
                   grads, want_grads)
      print("ok", name, shape, flush=True)


if __name__ == "__main__":
  main()
