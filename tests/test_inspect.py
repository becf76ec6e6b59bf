"""moe_jax.inspection: restored parameters, and routing numbers against a numpy
reference computed from the MoE layers' inputs."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from moe_jax import inspection as moe_inspect
from moe_jax.moe import metric_names
from tests import moe_reference, tiny_checkpoint
from tests.inspect_helpers import Bytes, moe_inputs

K, NUM_EXPERTS = 2, 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("ckpt")
  result = tiny_checkpoint.write(str(model_dir), num_steps=3)
  return model_dir, result


@pytest.fixture(scope="module")
def checkpoint(trained):
  return moe_inspect.open_checkpoint(trained[0])


def test_restores_the_trained_parameters(trained, checkpoint):
  _, result = trained
  assert checkpoint.step == 3
  jax.tree.map(np.testing.assert_array_equal, checkpoint.params,
               result.state.params)
  records = moe_inspect.param_records(checkpoint)
  leaves = jax.tree.leaves(result.state.params)
  assert len(records) == len(leaves)
  assert sum(r.size for r in records) == sum(x.size for x in leaves)
  wi = next(r for r in records
            if r.path == "encoder/block_0/layer_0/moe/experts/wi_0")
  assert wi.shape == (NUM_EXPERTS, 16, 32)
  assert wi.logical_axes == ("expert", "embed", "expert_mlp")
  total = sum(x.size for x in leaves)
  assert moe_inspect.format_param_table(records).splitlines()[-1] == (
      f"{len(leaves)} parameters, {total:,} elements")


def test_opens_an_earlier_step_and_refuses_a_missing_one(trained):
  assert moe_inspect.steps(trained[0]) == [1, 2, 3]
  assert moe_inspect.open_checkpoint(trained[0], step=2).step == 2
  with pytest.raises(ValueError, match="step=5"):
    moe_inspect.open_checkpoint(trained[0], step=5)


def test_routing_numbers_match_a_numpy_reference(checkpoint):
  batch = moe_inspect.text_batch(
      checkpoint, ["sparse experts", "route me, please"],
      vocabulary=Bytes())
  report = moe_inspect.route_batch(checkpoint, batch)
  inputs = moe_inputs(checkpoint, batch)
  assert [l.name for l in report.layers] == [
      "encoder/block_0/layer_0", "encoder/block_1/layer_0",
      "decoder/block_0/layer_0", "decoder/block_1/layer_0"]
  assert len(inputs) == len(report.layers)
  for layer, (x, mask) in zip(report.layers, inputs):
    params = checkpoint.params
    for part in layer.name.split("/"):
      params = params[part]
    kernel = np.asarray(params["moe"]["router"]["router_weights"]["kernel"],
                        np.float64)
    b, l, d = x.shape
    cap = moe_reference.capacity(b * l, NUM_EXPERTS, 0.5, 1)
    x, mask = x.reshape(b * l, d), mask.reshape(-1) > 0
    probs = moe_reference.softmax(x @ kernel)
    choices = np.argsort(-probs, axis=1, kind="stable")[:, :K]
    _, dispatched = moe_reference.token_choice(
        x, mask, kernel, np.zeros((NUM_EXPERTS, d, 1)),
        np.zeros((NUM_EXPERTS, 1, d)), K, cap)
    load = np.bincount(choices[dispatched], minlength=NUM_EXPERTS)
    np.testing.assert_array_equal(layer.expert_load, load)
    # First dispatched choice = the largest combine weight of the token.
    first = np.argmax(dispatched, axis=1)
    ids = np.where(dispatched.any(1), choices[np.arange(b * l), first],
                   moe_inspect.DROPPED)
    np.testing.assert_array_equal(layer.expert_ids.reshape(-1), ids)
    mask_ref = np.zeros((b * l, NUM_EXPERTS), bool)
    mask_ref[np.arange(b * l)[:, None].repeat(K, 1)[dispatched],
             choices[dispatched]] = True
    np.testing.assert_array_equal(layer.dispatch_mask.reshape(-1, 4),
                                  mask_ref)
    real = mask.sum()
    dropped = np.sum(~dispatched.any(1) & mask) / real
    assert dropped > 0  # capacity 0.5 with top-2 must drop
    np.testing.assert_allclose(layer.fraction_tokens_left_behind, dropped,
                               rtol=1e-6)
    np.testing.assert_allclose(layer.expert_usage,
                               load.sum() / (NUM_EXPERTS * cap), rtol=1e-6)
    entropy = -np.sum(probs * np.log(probs), axis=1)
    np.testing.assert_allclose(layer.router_entropy, entropy[mask].mean(),
                               rtol=1e-4)
    gates = np.take_along_axis(probs, choices, 1) * dispatched
    # flaxformer's: summed combine weights / dispatched (token, expert) pairs.
    np.testing.assert_allclose(layer.router_confidence,
                               gates[mask].sum() / dispatched[mask].sum(),
                               rtol=1e-4)


def test_token_tables_agree_with_loads(checkpoint):
  report = moe_inspect.route_text(checkpoint, ["expert choice"],
                                  vocabulary=Bytes())
  tokens, layers, table = report.expert_id_table("encoder")
  assert tokens[:6] == list("expert") and table.shape == (len(tokens),
                                                          len(layers))
  for i, layer in enumerate(report.layers):
    top = report.top_tokens(i, top=100)
    for expert, counted in top.items():
      assert sum(n for _, n in counted) == layer.expert_load[expert]
  assert report.top_tokens(report.layers[1].name) == report.top_tokens(1)
  with pytest.raises(ValueError, match="no sparse layer named"):
    report.top_tokens("encoder/block_9/layer_0")


def test_capture_leaves_outputs_unchanged(checkpoint):
  batch = moe_inspect.text_batch(checkpoint, ["same numbers"],
                                 vocabulary=Bytes())
  apply = lambda **kw: checkpoint.model.apply(
      {"params": checkpoint.params}, **batch, enable_dropout=False, **kw)
  plain = apply()
  captured, state = apply(mutable=[metric_names.ROUTING])
  np.testing.assert_array_equal(plain.logits, captured.logits)
  jax.tree.map(np.testing.assert_array_equal, plain.moe_stats,
               captured.moe_stats)
  assert metric_names.ROUTING in state


def test_plots_are_saved(checkpoint, tmp_path):
  report = moe_inspect.route_text(checkpoint, ["plot me"],
                                  vocabulary=Bytes())
  for name, draw in (("load", moe_inspect.load_heatmap),
                     ("left_behind", moe_inspect.fraction_left_behind)):
    fig = draw(report, path=tmp_path / f"{name}.png")
    assert fig.axes and (tmp_path / f"{name}.png").stat().st_size > 0
  fig = moe_inspect.expert_id_map(report, "decoder", path=tmp_path / "ids.png")
  assert (tmp_path / "ids.png").read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="no sparse layer in stack"):
    report.expert_id_table("nowhere")


def _initialized(scan_layers):
  from moe_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from moe_jax.models import build_model, configured_model_config, dummy_batch
  gin_utils.parse([tiny_checkpoint.GIN_FILE], tiny_checkpoint.BINDINGS + (
      f"SCAN_LAYERS = {scan_layers}",))
  config = configured_model_config()
  model = build_model(config)
  params = nn.unbox(model.init(jax.random.PRNGKey(0),
                               **dummy_batch(config, 1, 4, 4),
                               enable_dropout=False)["params"])
  return moe_inspect.Checkpoint(None, 0, config, model, params, None)


def test_scanned_layers_report_like_unrolled_layers():
  unrolled = _initialized(False)
  scanned = _initialized(True)
  params = dict(unrolled.params)
  for stack in ("encoder", "decoder"):
    blocks = dict(params[stack])
    per_block = [blocks.pop(f"block_{i}") for i in range(2)]
    blocks["blocks"] = jax.tree.map(lambda *a: np.stack(a), *per_block)
    params[stack] = blocks
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), params,
               scanned.params)
  scanned = moe_inspect.Checkpoint(None, 0, scanned.config, scanned.model,
                                   params, None)
  batch = tiny_checkpoint.batch_fn(0)
  want = moe_inspect.route_batch(unrolled, batch)
  got = moe_inspect.route_batch(scanned, batch)
  assert [l.name for l in got.layers] == [l.name for l in want.layers]
  for g, w in zip(got.layers, want.layers):
    np.testing.assert_array_equal(g.expert_load, w.expert_load)
    np.testing.assert_array_equal(g.expert_ids, w.expert_ids)
    np.testing.assert_allclose(g.router_probs, w.router_probs, atol=1e-5)
    np.testing.assert_allclose(g.router_entropy, w.router_entropy, rtol=1e-5)
