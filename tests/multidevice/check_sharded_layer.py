"""On 8 fake CPU devices: the MoE layer with sharded params equals one device.

Started by tests/test_partitioning.py; exits non-zero on a mismatch.
"""

from tests.multidevice import common  # first: checks XLA_FLAGS

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import flax.linen as nn

from moe_jax import partitioning
from moe_jax.moe.layer import MoeLayer


def main():
  assert jax.device_count() == 8, jax.device_count()
  x = common.layer_inputs()
  rules = partitioning.logical_axis_rules()
  for name, (router, dispatch) in common.ROUTERS.items():
    layer = MoeLayer(num_experts=common.NUM_EXPERTS, expert_hidden_dim=16,
                     router=router(), dispatch=dispatch, max_group_size=4)
    boxed = layer.init(jax.random.key(1), x, deterministic=True)["params"]
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, x, layer=layer: common.layer_loss(layer, p, x)))
    want = grad_fn(nn.unbox(boxed), x)
    for shape in common.MESHES:
      label = f"{name} {shape}"
      mesh = partitioning.make_mesh(*shape)
      sharded = common.place(boxed, mesh, rules, label)
      xs = jax.device_put(x, partitioning.replicated(mesh))
      with partitioning.axis_rules(mesh, rules):
        got = grad_fn(sharded, xs)
      common.assert_same(got, want, label)


if __name__ == "__main__":
  main()
