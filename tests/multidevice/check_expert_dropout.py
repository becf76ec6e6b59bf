"""On 8 fake CPU devices: expert dropout inside the shard_map path.

Started by tests/test_expert_parallel.py; exits non-zero on a mismatch.
With identity experts (relu, wi = wo = I) and positive inputs, the training
output over the evaluation output is, per element, 0 (dropped) or
1 / (1 - rate) (kept), so the mask is read off the output. For each mesh
and dispatch path, over several dropout keys:
* the kept fraction and the mean and variance of that ratio match the
  one-device layer and their expected values within tolerance;
* devices draw different masks: identical groups on different data shards,
  and the two F halves on different model shards, agree only as often as
  independent masks would;
* in evaluation mode the expert-parallel layer with dropout equals the one
  without exactly, and the one-device layer up to float32 rounding.
Then a FLAN-MoE preset (gin/models/flan_switch_base.gin at toy size, its
expert dropout 0.2) with expert_parallel=True builds and takes a training
gradient step, dropout changing the loss.
"""

from tests.multidevice import common  # first: checks XLA_FLAGS

import sys  # pylint: disable=g-import-not-at-top,g-bad-import-order

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import gin_utils, partitioning
from moe_jax.models import build_model, configured_model_config
from moe_jax.moe.dispatch import Dispatch
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter
from moe_jax.train.objective import LossConfig, training_loss
from moe_jax.train.step import model_inputs

RATE = 0.2
KEEP = 1.0 - RATE
WIDTH = 16
SEEDS = 6
MESHES = [(8, 1, 1), (2, 2, 2)]


def identity_params(boxed):
  """`boxed` with every expert's wi and wo the identity."""
  eye = jnp.broadcast_to(jnp.eye(WIDTH), (common.NUM_EXPERTS, WIDTH, WIDTH))
  params = nn.unbox(boxed)
  experts = dict(params["experts"], wi=eye, wo=eye)
  return nn.unbox(dict(params, experts=experts))


def ratios(layer, params, x, eval_y, mesh=None, rules=None):
  """<[SEEDS, B, L, D]> training output / evaluation output."""
  fn = jax.jit(lambda p, key: layer.apply(
      {"params": p}, x, deterministic=False, rngs={"dropout": key})[0])
  keys = [jax.random.key(100 + seed) for seed in range(SEEDS)]
  if mesh is None:
    ys = [fn(params, key) for key in keys]
  else:
    with partitioning.axis_rules(mesh, rules):
      ys = [fn(params, key) for key in keys]
  return np.stack([np.asarray(y) for y in ys]) / eval_y


def agreement(a, b):
  return float(np.mean((a > 0) == (b > 0)))


def check_layer(dispatch, rules):
  # 8 identical sequences of 64 positive tokens: 8 identical groups.
  one = jnp.abs(jax.random.normal(jax.random.key(0), (1, 64, WIDTH))) + 0.1
  x = jnp.broadcast_to(one, (8, 64, WIDTH))
  plain = MoeLayer(num_experts=common.NUM_EXPERTS, expert_hidden_dim=WIDTH,
                   router=TokenChoiceRouter(num_selected_experts=1),
                   dispatch=dispatch, max_group_size=64, activation="relu",
                   train_capacity_factor=common.NUM_EXPERTS,
                   eval_capacity_factor=common.NUM_EXPERTS,
                   expert_dropout_rate=RATE)
  boxed = plain.init(jax.random.key(1), x, deterministic=True)["params"]
  params = identity_params(boxed)
  eval_y = np.asarray(plain.apply({"params": params}, x,
                                  deterministic=True)[0])
  assert np.all(eval_y > 0), "every token must reach an expert"
  want = ratios(plain, params, x, eval_y)
  parallel = plain.clone(expert_parallel=True)
  no_dropout = parallel.clone(expert_dropout_rate=0.0)
  spread = 5 * np.sqrt(KEEP * RATE / want.size)  # 5 sigma of a fraction
  for shape in MESHES:
    label = f"dropout {dispatch.value} {shape}"
    mesh = partitioning.make_mesh(*shape)
    sharded = jax.device_put(params, nn.unbox(partitioning.shardings_for(
        boxed, mesh, rules)))
    with partitioning.axis_rules(mesh, rules):
      evaluate = lambda layer: np.asarray(jax.jit(lambda p: layer.apply(
          {"params": p}, x, deterministic=True)[0])(sharded))
      eval_parallel = evaluate(parallel)
      np.testing.assert_array_equal(eval_parallel, evaluate(no_dropout),
                                    err_msg=label)
    np.testing.assert_allclose(eval_parallel, eval_y, rtol=1e-5, err_msg=label)
    got = ratios(parallel, sharded, x, eval_y, mesh, rules)
    kept = got > 0
    np.testing.assert_allclose(got[kept], 1 / KEEP, rtol=1e-4, err_msg=label)
    for name, fraction in (("expert parallel", kept.mean()),
                           ("one device", (want > 0).mean())):
      assert abs(fraction - KEEP) < spread, (label, name, fraction)
    assert abs(kept.mean() - (want > 0).mean()) < 2 * spread, label
    # Ratio mean 1 (unbiased), variance 1 / keep - 1, on both.
    for stats in (got, want):
      assert abs(stats.mean() - 1) < 5 * np.sqrt(RATE / KEEP / stats.size), (
          label, stats.mean())
      np.testing.assert_allclose(stats.var(), 1 / KEEP - 1, rtol=0.05,
                                 err_msg=label)
    independent = KEEP ** 2 + RATE ** 2
    pairs = {"groups 0 and 1": (got[:, 0], got[:, 1]),
             "F halves": (got[..., :WIDTH // 2], got[..., WIDTH // 2:])}
    for name, (a, b) in pairs.items():
      assert abs(agreement(a, b) - independent) < 0.03, (
          label, name, agreement(a, b))
    print("ok", label, f"kept {kept.mean():.4f} (one device "
          f"{(want > 0).mean():.4f})", flush=True)


def check_flan_preset(rules):
  gin_utils.parse(
      ["gin/models/flan_switch_base.gin",
       "gin/partitioning/expert_parallel_shard_map.gin"],
      ["EMBED_DIM = 16", "MLP_DIM = 32", "NUM_HEADS = 2", "HEAD_DIM = 8",
       "NUM_ENCODER_LAYERS = 2", "NUM_DECODER_LAYERS = 2", "VOCAB_SIZE = 64",
       "NUM_EXPERTS = 8", "MAX_GROUP_SIZE = 8"])
  config = configured_model_config()
  for stack in ("encoder", "decoder"):
    layer = config.moe(stack).layer
    assert layer.expert_parallel and layer.expert_dropout_rate == 0.2, layer
  model = build_model(config)
  plain = build_model(config.with_moe_layers(expert_parallel=False))
  rng = np.random.default_rng(0)
  tokens = lambda: rng.integers(1, 64, (8, 8)).astype(np.int32)
  targets = tokens()
  batch = {"encoder_input_tokens": tokens(), "decoder_target_tokens": targets,
           "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
           "decoder_loss_weights": np.ones((8, 8), np.float32)}
  mesh = partitioning.make_mesh(2, 4, 1)
  boxed = plain.init(jax.random.key(1), **model_inputs(batch),
                     enable_dropout=False)["params"]
  params = common.place(boxed, mesh, rules, "flan_switch_base")

  def loss(p, key):
    output = model.apply({"params": p}, **model_inputs(batch),
                         enable_dropout=True, rngs={"dropout": key})
    return training_loss(output, batch, LossConfig())[0]

  step = jax.jit(jax.value_and_grad(loss))
  with partitioning.axis_rules(mesh, rules):
    losses, grads = zip(*[step(params, jax.random.key(seed))
                          for seed in (2, 3)])
  assert np.all(np.isfinite(losses)), losses
  # Training is random only through the expert dropout (no other dropout,
  # no jitter, top-1): two keys, two losses.
  assert losses[0] != losses[1], "expert dropout 0.2 left the loss unchanged"
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))
  print("ok flan_switch_base expert_parallel step", float(losses[0]),
        flush=True)


def main(argv):
  del argv
  assert jax.device_count() == 8, jax.device_count()
  rules = partitioning.logical_axis_rules()
  for dispatch in (Dispatch.SCATTER, Dispatch.DROPLESS):
    check_layer(dispatch, rules)
  check_flan_preset(rules)


if __name__ == "__main__":
  main(sys.argv)
