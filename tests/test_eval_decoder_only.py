"""Decoder-only (prefix-LM) predictions in the evaluator and in infer, and
the checks that refuse, before training, an eval the model cannot run."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

import tasks  # noqa: F401  (registers mini_flan)
from moe_jax import infer
from moe_jax.models import Architecture, TransformerConfig
from moe_jax.train import eval_checks
from moe_jax.train import run as run_lib
from moe_jax.train.data import DataConfig
from moe_jax.train.evaluation import EvalConfig, Evaluator, ModelFns

TASK = "mini_flan_parity_zs"  # exact-match metric: needs predictions
RANK_TASK = "mini_flan_parity_rank"  # rank classification: needs scores
LENGTHS = {"inputs": 32, "targets": 8}
ROWS = 4
MODEL = TransformerConfig(
    vocab_size=259, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
    num_decoder_layers=2, architecture=Architecture.DECODER_ONLY)


@functools.cache
def fns_and_params():
  fns = ModelFns(MODEL, "prefix_lm", LENGTHS["targets"])
  dummy = jnp.zeros((ROWS, sum(LENGTHS.values())), jnp.int32)
  params = jax.jit(lambda key: fns.model.init(
      key, dummy, enable_dropout=False)["params"])(jax.random.PRNGKey(3))
  return fns, params


def seqio_batch():
  """The first ROWS validation examples as the evaluator's converter
  gives them."""
  dataset = seqio.get_dataset(
      TASK, LENGTHS, dataset_split="validation", shuffle=False, num_epochs=1,
      feature_converter=seqio.PrefixLMFeatureConverter(pack=False))
  return next(dataset.batch(ROWS).as_numpy_iterator())


def iterated_argmax(model, params, tokens, causal, length) -> np.ndarray:
  """<int32>[B, length] greedy continuation of each prompt, one full pass
  (no cache) per token."""
  tokens = np.asarray(tokens * causal)
  fed = causal.sum(1) - 1  # position of the last prompt token
  apply = jax.jit(lambda t: model.apply({"params": params}, t,
                                        decoder_causal_attention=causal,
                                        enable_dropout=False).logits)
  out = np.zeros((len(tokens), length), np.int32)
  done = np.zeros(len(tokens), bool)
  for t in range(length):
    logits = np.asarray(apply(tokens))
    step = logits[np.arange(len(tokens)), fed + t].argmax(-1)
    out[:, t] = np.where(done, 0, step)
    done |= step == 1
    if t + 1 < length:
      tokens[np.arange(len(tokens)), fed + t + 1] = step
  return out


def test_decoder_only_predictions_continue_the_prompt():
  fns, params = fns_and_params()
  batch = seqio_batch()
  got = np.asarray(fns.predict_batch(params, batch))
  want = iterated_argmax(fns.model, params, batch["decoder_input_tokens"],
                         batch["decoder_causal_attention"],
                         LENGTHS["targets"])
  np.testing.assert_array_equal(got, want)
  # infer's prompt from input ids is the converter's prompt.
  task = seqio.get_mixture_or_task(TASK)
  examples = task.get_dataset(LENGTHS, "validation", shuffle=False)
  inputs = np.zeros((ROWS, LENGTHS["inputs"]), np.int32)
  for row, example in zip(inputs, examples.take(ROWS).as_numpy_iterator()):
    row[:len(example["inputs"])] = example["inputs"]
  prompt = fns.prompt_batch(inputs)
  causal = batch["decoder_causal_attention"]
  np.testing.assert_array_equal(prompt["decoder_causal_attention"], causal)
  np.testing.assert_array_equal(prompt["decoder_input_tokens"] * causal,
                                batch["decoder_input_tokens"] * causal)


def test_decoder_only_evaluator_and_infer(tmp_path):
  fns, params = fns_and_params()
  evaluator = Evaluator(
      EvalConfig(TASK, task_feature_lengths=LENGTHS, batch_size=ROWS,
                 num_examples=ROWS), MODEL, "prefix_lm", str(tmp_path))
  metrics = evaluator.evaluate(params, 0)
  saved = json.loads((tmp_path / "eval" / "metrics_0.json").read_text())
  assert saved["metrics"] == metrics and "exact_match" in metrics[TASK]

  vocabulary = seqio.get_mixture_or_task(TASK).output_features[
      "targets"].vocabulary
  records = infer.task_inputs(TASK, "validation", ROWS)
  predicted = infer.predict(fns, params, vocabulary, records,
                            LENGTHS["inputs"], ROWS)
  want = np.asarray(fns.predict_batch(params, seqio_batch()))
  for record, row in zip(predicted, want):
    ids = row.tolist()
    assert record["prediction"] == vocabulary.decode(ids[:ids.index(1)] if
                                                     1 in ids else ids)
  hits = np.mean([r["prediction"] == r["targets"] for r in predicted])
  assert metrics[TASK]["exact_match"] == pytest.approx(100 * hits)


def run(objective, eval_task, tmp_path):
  return run_lib.Run(
      model=MODEL,
      train=run_lib.TrainConfig(model_dir=str(tmp_path), num_steps=1),
      data=DataConfig(TASK, LENGTHS, batch_size=ROWS, objective=objective),
      eval=EvalConfig(eval_task, task_feature_lengths=LENGTHS))


def test_an_eval_the_model_cannot_run_fails_when_the_run_is_resolved(
    tmp_path):
  with pytest.raises(ValueError, match=f"eval task {TASK} has prediction "
                     "metrics; objective=lm.*prefix_lm"):
    run("lm", TASK, tmp_path)
  assert not any(tmp_path.iterdir())
  run("lm", RANK_TASK, tmp_path)  # scores need no prompt
  run("prefix_lm", TASK, tmp_path)
  # And when decoding is asked of such a model directly (e.g. infer).
  fns = ModelFns(MODEL, "lm", LENGTHS["targets"])
  with pytest.raises(ValueError, match="objective=lm"):
    fns.predict_batch(fns_and_params()[1], fns.prompt_batch(
        np.ones((ROWS, LENGTHS["inputs"]), np.int32)))


def test_an_eval_task_without_a_feature_the_objective_needs(tmp_path):
  name = "decoding_test_targets_only"
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(
          lambda split, shuffle_files: None, splits=["validation"]),
      output_features={"targets": seqio.Feature(seqio.ByteVocabulary())},
      metric_fns=[lambda targets, scores: {}])
  try:
    with pytest.raises(ValueError, match=f"eval task {name} has no feature "
                       "'inputs', which objective=prefix_lm needs"):
      run("prefix_lm", name, tmp_path)
    eval_checks.check_eval_tasks(name, "validation", "lm")  # scores only
  finally:
    seqio.TaskRegistry.remove(name)
