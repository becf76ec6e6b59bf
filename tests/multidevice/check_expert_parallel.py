"""On 8 fake CPU devices: the shard_map expert-parallel layer equals one device.

Started by tests/test_expert_parallel.py with the cases to run ("layer",
"model"; default both); exits non-zero on a mismatch. For every mesh and
router, the MoE layer and a tiny sparse T5 with `expert_parallel=True` under
the mesh give the loss and gradients of the plain layer / model on one
device; expert kernels hold E / expert experts per
device; the compiled program has an all-to-all (capacity paths) or a
collective-permute (dropless: the CPU ragged exchange, by default with room
for every row); num_experts not divisible by the
expert axis is a ValueError.
"""

from tests.multidevice import common  # first: checks XLA_FLAGS

import sys  # pylint: disable=g-import-not-at-top,g-bad-import-order

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import partitioning
from moe_jax.moe.dispatch import Dispatch
from moe_jax.moe.layer import MoeLayer
from moe_jax.models import MoeConfig, TransformerConfig, build_model
from moe_jax.moe.routers import TokenChoiceRouter
from moe_jax.train.objective import LossConfig, training_loss
from moe_jax.train.step import model_inputs

NUM_EXPERTS = common.NUM_EXPERTS
# Collectives each path must compile to (HLO op names).
COLLECTIVES = {Dispatch.SCATTER: ("all-to-all",),
               Dispatch.EINSUM: ("all-to-all",),
               Dispatch.DROPLESS: ("collective-permute",)}


class LayerCase:
  """The MoE layer; loss = mean(y^2) + its losses."""

  def __init__(self, router, dispatch):
    self.x = common.layer_inputs()
    self.plain = MoeLayer(num_experts=NUM_EXPERTS, expert_hidden_dim=16,
                          router=router(), dispatch=dispatch, max_group_size=4)
    self.parallel = self.plain.clone(expert_parallel=True)
    self.boxed = self.plain.init(jax.random.key(1), self.x,
                                 deterministic=True)["params"]

  loss = staticmethod(common.layer_loss)


class ModelCase:
  """A tiny sparse T5 (one MoE layer per stack), training loss."""

  def __init__(self, router, dispatch):
    moe = MoeConfig(layer=MoeLayer(router=router(), num_experts=NUM_EXPERTS,
                                   dispatch=dispatch, max_group_size=4,
                                   min_expert_capacity=1,
                                   allow_expert_choice_in_causal=True),
                    sparse_every=1)
    config = TransformerConfig(
        vocab_size=32, emb_dim=8, num_heads=2, head_dim=4, mlp_dim=16,
        num_encoder_layers=1, num_decoder_layers=1, encoder_moe=moe,
        decoder_moe=moe)
    rng = np.random.default_rng(0)
    tokens = lambda: rng.integers(1, 32, (8, 4)).astype(np.int32)
    targets = tokens()
    self.x = {"encoder_input_tokens": tokens(), "decoder_target_tokens": targets,
              "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
              "decoder_loss_weights": np.ones((8, 4), np.float32)}
    self.plain = build_model(config)
    self.parallel = build_model(config.with_moe_layers(expert_parallel=True))
    self.boxed = self.plain.init(jax.random.key(1), **model_inputs(self.x),
                                 enable_dropout=False)["params"]

  def loss(self, model, params, batch):
    output = model.apply({"params": params}, **model_inputs(batch),
                         enable_dropout=False)
    return training_loss(output, batch, LossConfig())[0]


def check(case, name, dispatch, rules):
  grad_fn = lambda module: jax.jit(jax.value_and_grad(
      lambda p, x: case.loss(module, p, x)))
  want = grad_fn(case.plain)(nn.unbox(case.boxed), case.x)
  parallel_fn = grad_fn(case.parallel)
  for shape in common.MESHES:
    label = f"{type(case).__name__} {name} {shape}"
    mesh = partitioning.make_mesh(*shape)
    sharded = common.place(case.boxed, mesh, rules, label)
    xs = jax.device_put(case.x, partitioning.replicated(mesh))
    with partitioning.axis_rules(mesh, rules):
      if shape[1] > 1:
        hlo = parallel_fn.lower(sharded, xs).compile().as_text()
        for op in COLLECTIVES[dispatch]:
          assert op in hlo, (label, op)
      got = parallel_fn(sharded, xs)
    common.assert_same(got, want, label)


def check_indivisible_experts(rules):
  layer = MoeLayer(num_experts=6, expert_hidden_dim=16,
                   router=TokenChoiceRouter(), expert_parallel=True,
                   max_group_size=4)
  x = jnp.ones((8, 4, 8))
  with partitioning.axis_rules(partitioning.make_mesh(2, 4, 1), rules):
    try:
      layer.init(jax.random.key(0), x, deterministic=True)
    except ValueError as error:
      assert "num_experts=6 is not divisible" in str(error), error
    else:
      raise AssertionError("num_experts=6 on an expert axis of 4 passed")


def main(argv):
  assert jax.device_count() == 8, jax.device_count()
  rules = partitioning.logical_axis_rules()
  check_indivisible_experts(rules)
  cases = {"layer": LayerCase, "model": ModelCase}
  for case_type in [cases[arg] for arg in argv[1:]] or cases.values():
    for name, (router, dispatch) in common.ROUTERS.items():
      check(case_type(router, dispatch), name, dispatch, rules)


if __name__ == "__main__":
  main(sys.argv)
