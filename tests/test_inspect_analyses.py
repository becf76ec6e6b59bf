"""moe_jax.inspection.analyses and its command line, on a tiny checkpoint:
each number against a direct computation from the captured routing, the
MoE layers' inputs, or the logits."""

import collections
import csv
import json

import numpy as np
import pytest

from moe_jax import inspection as moe_inspect
from moe_jax.inspection import analyses, analyze, task_batches
from moe_jax.models import build_model
from tests import moe_reference, tiny_checkpoint
from tests.inspect_helpers import Bytes, moe_inputs

NUM_EXPERTS, EVAL_FACTOR = 4, 0.5  # the tiny checkpoint's
TASKS = {"qa": ["Question: who routes?", "Q: where do tokens go"],
         "translate": ["Translate to German: the house is small."]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt")
  tiny_checkpoint.write(str(path), num_steps=3)
  return path


@pytest.fixture(scope="module")
def checkpoint(model_dir):
  return moe_inspect.open_checkpoint(model_dir)


def _batch(checkpoint, texts):
  return moe_inspect.text_batch(checkpoint, texts, vocabulary=Bytes())


def test_utilization_is_dispatched_over_capacity(checkpoint):
  batches = {name: _batch(checkpoint, texts) for name, texts in TASKS.items()}
  result = analyses.utilization(checkpoint, batches)
  assert result.names == ("qa", "translate") and result.usage.shape == (2, 4)
  for row, (name, batch) in zip(result.usage, batches.items()):
    report = moe_inspect.route_batch(checkpoint, batch)
    for usage, layer in zip(row, report.layers):
      tokens = layer.token_mask.size  # one group: the whole batch
      cap = moe_reference.capacity(tokens, NUM_EXPERTS, EVAL_FACTOR, 1)
      np.testing.assert_allclose(
          usage, layer.dispatch_mask.sum() / (NUM_EXPERTS * cap), rtol=1e-6)
  rows = result.rows()
  assert rows[1]["name"] == "translate"
  assert rows[1]["mean"] == pytest.approx(result.usage[1].mean())


def test_drops_count_every_undispatched_position(checkpoint):
  report = moe_inspect.route_batch(
      checkpoint, _batch(checkpoint, TASKS["qa"] + TASKS["translate"]),
      Bytes())
  result = analyses.drops(report, top=1000)
  dropped, seen = collections.Counter(), collections.Counter()
  for i, layer in enumerate(report.layers):
    ids = report.tokens[layer.stack]
    left = real = 0
    for b, l in np.ndindex(*ids.shape):
      if not layer.token_mask[b, l]:
        continue
      real += 1
      seen[int(ids[b, l])] += 1
      if not layer.dispatch_mask[b, l].any():
        left += 1
        dropped[int(ids[b, l])] += 1
    assert result.drop_ratio[i] == pytest.approx(left / real, rel=1e-6)
  assert sum(dropped.values()) > 0  # eval capacity 0.5 with top-2 drops
  got = {t.token: (t.dropped, t.seen) for t in result.tokens}
  assert got == {report.token_text(t): (n, seen[t])
                 for t, n in dropped.items()}
  counts = [t.dropped for t in result.tokens]
  assert counts == sorted(counts, reverse=True)
  top = analyses.drops(report, top=3)
  assert top.tokens == result.tokens[:3]
  assert top.token_rows()[0]["rate"] == pytest.approx(
      top.tokens[0].dropped / top.tokens[0].seen)


def _top1(checkpoint, batch, names):
  """<bool>[R, tokens] real tokens and <int>[R, tokens] argmax of the
  router probabilities of sparse layers `names`, from each MoE layer's input
  and router kernel."""
  masks, choices = [], []
  for name, (x, mask) in zip(names, moe_inputs(checkpoint, batch)):
    params = checkpoint.params
    for part in name.split("/"):
      params = params[part]
    kernel = np.asarray(params["moe"]["router"]["router_weights"]["kernel"],
                        np.float64)
    choices.append(np.argmax(x.reshape(-1, x.shape[-1]) @ kernel, -1))
    masks.append(mask.reshape(-1) > 0)
  return np.array(masks), np.array(choices)


def test_routing_change_between_two_steps(model_dir, checkpoint):
  first = moe_inspect.open_checkpoint(model_dir, step=1)
  batch = _batch(checkpoint, TASKS["qa"] + TASKS["translate"])
  result = analyses.compare_checkpoints(first, checkpoint, batch)
  assert result.labels == ("step 1", "step 3")
  real, before = _top1(first, batch, result.layers)
  _, after = _top1(checkpoint, batch, result.layers)
  want = ((before != after) & real).sum(1) / real.sum(1)
  np.testing.assert_allclose(result.changed, want, rtol=1e-6)
  assert want.max() > 0  # two Adam steps at lr 1e-2 move some tokens
  same = analyses.compare_checkpoints(checkpoint, checkpoint, batch)
  np.testing.assert_array_equal(same.changed, 0)
  other = moe_inspect.route_batch(checkpoint, _batch(checkpoint, ["x"]))
  with pytest.raises(ValueError, match="different"):
    analyses.routing_change(moe_inspect.route_batch(checkpoint, batch), other)


def test_capacity_sweep_scores_and_drops(checkpoint):
  batch = _batch(checkpoint, TASKS["qa"] + TASKS["translate"])
  factors = (0.25, EVAL_FACTOR, 8.0)
  result = analyses.capacity_sweep(checkpoint, batch, factors)
  targets = batch["decoder_target_tokens"]
  weights = targets > 0
  for i, factor in enumerate(factors):
    model = build_model(checkpoint.config.with_moe_layers(
        eval_capacity_factor=factor))
    at_factor = moe_inspect.Checkpoint(None, 0, checkpoint.config, model,
                                       checkpoint.params, None)
    report = moe_inspect.route_batch(at_factor, batch)
    for layer, value in zip(report.layers, result.drop_fraction[i]):
      left = (layer.token_mask & ~layer.dispatch_mask.any(-1)).sum()
      assert value == pytest.approx(left / layer.token_mask.sum(), rel=1e-6)
    logits = np.asarray(model.apply(
        {"params": checkpoint.params}, **batch, enable_dropout=False).logits,
        np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)
                                       ).sum(-1, keepdims=True)) - logits.max(
                                           -1, keepdims=True)
    on_target = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    assert result.accuracy[i] == pytest.approx(
        (logits.argmax(-1) == targets)[weights].mean(), abs=1e-6)
    assert result.cross_entropy[i] == pytest.approx(
        -on_target[weights].mean(), rel=1e-4)
  assert result.drop_fraction[0].mean() > result.drop_fraction[1].mean() > 0
  np.testing.assert_array_equal(result.drop_fraction[2], 0)
  own = moe_inspect.route_batch(checkpoint, batch)
  np.testing.assert_allclose(
      result.drop_fraction[1],
      [l.fraction_tokens_left_behind for l in own.layers], rtol=1e-6)
  assert result.rows()[2]["drop_fraction"] == 0


def test_command_line_writes_tables_and_pngs(model_dir, tmp_path):
  examples = tmp_path / "examples.jsonl"
  examples.write_text("\n".join(
      json.dumps({"task": task, "inputs": text, "targets": text[::-1]})
      for task, texts in TASKS.items() for text in texts))
  out = tmp_path / "out"
  analyze.main([str(model_dir), "--examples", str(examples), "--out",
                str(out), "--compare_step", "1", "--capacity_factors",
                "0.5,2"])
  for name in ("utilization", "drops", "capacity_sweep", "routing_change"):
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
  with open(out / "utilization.csv") as f:
    rows = list(csv.DictReader(f))
  checkpoint = moe_inspect.open_checkpoint(model_dir)
  batches = {task: moe_inspect.text_batch(checkpoint, texts,
                                          [t[::-1] for t in texts], Bytes())
             for task, texts in TASKS.items()}
  want = analyses.utilization(checkpoint, batches)
  assert [r["name"] for r in rows] == list(want.names)
  np.testing.assert_allclose([float(r["mean"]) for r in rows],
                             want.usage.mean(1), rtol=1e-5)
  with open(out / "capacity_sweep.csv") as f:
    assert [float(r["eval_capacity_factor"]) for r in csv.DictReader(f)] == [
        0.5, 2.0]
  assert (out / "dropped_tokens.csv").read_text().startswith(
      "token,dropped,seen,rate")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"task": "qa"}\n')
  with pytest.raises(ValueError, match="bad.jsonl:1: .*'inputs'"):
    analyze.read_examples(bad)


MIXTURE_TEXTS = {"routing_test_qa": [("who routes?", "the router"),
                                     ("where to?", "an expert")],
                 "routing_test_copy": [("copy me", "copy me")]}
LENGTHS = {"inputs": 16, "targets": 12}


@pytest.fixture
def mixture():
  """A registered mixture of two in-memory byte-vocabulary tasks."""
  import seqio
  import tensorflow as tf
  features = {k: seqio.Feature(seqio.ByteVocabulary())
              for k in ("inputs", "targets")}
  for name, pairs in MIXTURE_TEXTS.items():
    seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(
        lambda split, shuffle_files, pairs=pairs:
        tf.data.Dataset.from_tensor_slices(
            {"inputs": [p[0] for p in pairs],
             "targets": [p[1] for p in pairs]}),
        splits=["validation"]),
        preprocessors=[seqio.preprocessors.tokenize,
                       seqio.preprocessors.append_eos],
        output_features=features)
  seqio.MixtureRegistry.add("routing_test_mixture", list(MIXTURE_TEXTS),
                            default_rate=1.0)
  yield "routing_test_mixture"
  seqio.MixtureRegistry.remove("routing_test_mixture")
  for name in MIXTURE_TEXTS:
    seqio.TaskRegistry.remove(name)


def _padded(texts, length):
  """<int32>[N, length] byte ids (byte + 3), EOS (1), then padding."""
  out = np.zeros((len(texts), length), np.int32)
  for i, text in enumerate(texts):
    ids = [b + 3 for b in text.encode()] + [1]
    out[i, :len(ids)] = ids
  return out


def test_mixture_batches_hold_each_tasks_examples(checkpoint, mixture):
  batches = task_batches.task_batches(checkpoint, mixture,
                                      task_feature_lengths=LENGTHS)
  assert list(batches) == sorted(MIXTURE_TEXTS)  # seqio sorts by name
  for name, pairs in MIXTURE_TEXTS.items():
    targets = _padded([t for _, t in pairs], LENGTHS["targets"])
    want = {"encoder_input_tokens": _padded([i for i, _ in pairs],
                                            LENGTHS["inputs"]),
            "decoder_target_tokens": targets,
            "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1]}
    for feature, value in want.items():
      np.testing.assert_array_equal(batches[name][feature], value)
  first = task_batches.task_batches(checkpoint, mixture, examples_per_task=1,
                                    task_feature_lengths=LENGTHS)
  assert [len(b["decoder_target_tokens"]) for b in first.values()] == [1, 1]
  with pytest.raises(ValueError, match="examples_per_task must be >= 1"):
    task_batches.task_batches(checkpoint, mixture, examples_per_task=0)


def test_command_line_utilization_per_task_of_a_mixture(model_dir, mixture,
                                                        tmp_path):
  out = tmp_path / "out"
  analyze.main([str(model_dir), "--mixture", mixture, "--out", str(out),
                "--feature_lengths", "inputs=16,targets=12",
                "--capacity_factors", "2"])
  with open(out / "utilization.csv") as f:
    rows = list(csv.DictReader(f))
  checkpoint = moe_inspect.open_checkpoint(model_dir)
  want = analyses.utilization(checkpoint, task_batches.task_batches(
      checkpoint, mixture, task_feature_lengths=LENGTHS))
  assert [r["name"] for r in rows] == sorted(MIXTURE_TEXTS)
  np.testing.assert_allclose([float(r["mean"]) for r in rows],
                             want.usage.mean(1), rtol=1e-5)
  assert (out / "utilization.png").read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="exactly one of --examples"):
    analyze.run(str(model_dir), str(out))
  with pytest.raises(ValueError, match="--feature_lengths: .*'targets'"):
    analyze.feature_lengths("inputs=16,targets")
