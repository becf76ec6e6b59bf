"""What the checks on 8 fake CPU devices share: the cases and the comparison.

Imported first by each check module, which tests/multidevice/runner.py starts
in a subprocess with XLA_FLAGS set.
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
from moe_jax.moe.routers import ExpertChoiceRouter, TokenChoiceRouter

NUM_EXPERTS = 8
# (data, expert, model) mesh shapes.
MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
# name: (router factory, dispatch path).
ROUTERS = {
    "top1": (lambda: TokenChoiceRouter(num_selected_experts=1),
             Dispatch.SCATTER),
    "top2": (lambda: TokenChoiceRouter(num_selected_experts=2),
             Dispatch.EINSUM),
    "expert_choice": (ExpertChoiceRouter, Dispatch.SCATTER),
    "dropless": (lambda: TokenChoiceRouter(num_selected_experts=2),
                 Dispatch.DROPLESS),
}


def layer_inputs():
  """<float32>[8, 4, 8]: 8 groups of 4 tokens at max_group_size=4."""
  return jax.random.normal(jax.random.key(0), (8, 4, 8), jnp.float32)


def layer_loss(layer, params, x):
  """mean(y^2) + the layer's routing losses."""
  y, stats = layer.apply({"params": params}, x, deterministic=True)
  return jnp.mean(y ** 2) + stats.auxiliary_loss + stats.router_z_loss


def place(boxed, mesh, rules, label):
  """The unboxed params sharded by `rules`, after checking that every expert
  kernel holds E / expert experts per device."""
  shardings = nn.unbox(partitioning.shardings_for(boxed, mesh, rules))
  sharded = jax.device_put(nn.unbox(boxed), shardings)
  kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(
      sharded) if "experts" in jax.tree_util.keystr(path)]
  assert kernels, label
  for kernel in kernels:
    local = kernel.addressable_shards[0].data.shape
    assert local[0] == NUM_EXPERTS // mesh.shape["expert"], (label, local)
  return sharded


def assert_same(got, want, label):
  """(loss, grads) pairs equal up to float32 reduction order."""
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6,
                             err_msg=label)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-4, atol=1e-6, err_msg=label), got[1], want[1])
  print("ok", label, flush=True)
