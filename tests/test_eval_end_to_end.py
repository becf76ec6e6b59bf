"""The evaluator end to end on a tiny sparse model: an MMLU rank task and a
GSM8K-style task read from small local files, scored by
`moe_jax.train.evaluation.Evaluator`, equal to the same metrics computed
here from the model's own log-likelihoods and greedy continuations (full
forward passes, no cache, no SeqIO)."""

import csv
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from flax import linen as nn

import tasks  # noqa: F401  # registers everything
from moe_jax.models import MoeConfig, TransformerConfig, build_model
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter
from moe_jax.train.evaluation import EvalConfig, Evaluator
from tasks import data_dir
from tasks import metrics
from tasks import mmlu

EOS = 1
LENGTHS = {"inputs": 192, "targets": 8}
# Capacity for every token: a row's outputs do not depend on its batch.
MOE = MoeConfig(layer=MoeLayer(
    router=TokenChoiceRouter(num_selected_experts=2), num_experts=4,
    eval_capacity_factor=16.0, min_expert_capacity=64), sparse_every=1)
MODEL = TransformerConfig(
    vocab_size=259, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
    num_encoder_layers=1, num_decoder_layers=2, encoder_moe=MOE,
    decoder_moe=MOE)
VOCAB = seqio.ByteVocabulary()
DIGITS = [VOCAB.encode(str(d))[0] for d in range(10)]
LETTERS = [VOCAB.encode(letter)[0] for letter in mmlu.LETTERS]
QUESTIONS = ["Tom has 3 apples and buys 4. How many?", "What is 12 + 30?",
             "A box holds 6 eggs. How many in 5 boxes?", "Half of 10?"]
MMLU_ROWS = [["Which bone is in the arm?", "femur", "ulna", "rib", "skull"],
             ["Which organ pumps blood?", "lung", "liver", "heart", "skin"],
             ["How many lungs?", "one", "two", "three", "four"],
             ["Where is the tibia?", "leg", "arm", "head", "hand"]]


@functools.cache
def model_and_params():
  """The model and its params, the output projection kept only for the
  digits, MMLU's letters and EOS, so that greedy answers hold numbers."""
  model = build_model(MODEL)
  dummy = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(jax.jit(lambda key: model.init(
      key, dummy, dummy, dummy, enable_dropout=False)["params"])(
          jax.random.PRNGKey(0)))
  keep = np.zeros(MODEL.vocab_size, np.float32)
  keep[DIGITS + LETTERS + [EOS]] = 1.0
  params["embedder"]["logits_dense"]["kernel"] *= keep
  return model, params


def _ids(text, length):
  ids = VOCAB.encode(text) + [EOS]
  assert len(ids) <= length, text
  return np.array(ids + [0] * (length - len(ids)), np.int32)


@functools.cache
def _forward():
  model, _ = model_and_params()
  return jax.jit(lambda params, inputs, decoder_inputs, targets: model.apply(
      {"params": params}, inputs, decoder_inputs, targets,
      enable_dropout=False).logits)


def _logits(prompt: str, decoder_inputs, targets) -> np.ndarray:
  """<float32>[Lt, V] of one full forward pass over one row; the decoder
  rows are padded to Lt (causal attention: later positions do not change
  earlier ones)."""
  pad = lambda ids: np.array([list(ids) + [0] * (
      LENGTHS["targets"] - len(ids))], np.int32)
  inputs = _ids(prompt, LENGTHS["inputs"])[None]
  return np.asarray(_forward()(model_and_params()[1], inputs,
                               pad(decoder_inputs), pad(targets)))[0]


def log_likelihood(prompt: str, target: str) -> float:
  """Sum over the target's tokens (and EOS) of their log-probability."""
  targets = VOCAB.encode(target) + [EOS]
  logits = _logits(prompt, [0] + targets[:-1], targets)
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  return float(sum(log_probs[t, token] for t, token in enumerate(targets)))


def greedy_text(prompt: str) -> str:
  """The greedy continuation, one full pass per token, up to EOS."""
  out = []
  for _ in range(LENGTHS["targets"]):
    # Every fed position is a real token (its target id is not 0).
    logits = _logits(prompt, [0] + out, [EOS] * (len(out) + 1))
    token = int(np.argmax(logits[len(out)]))
    if token == EOS:
      break
    out.append(token)
  return VOCAB.decode(out)


def _evaluate(name, split, tmp_path):
  evaluator = Evaluator(EvalConfig(name, split=split,
                                   task_feature_lengths=LENGTHS,
                                   batch_size=6), MODEL, "enc_dec", None)
  return evaluator.evaluate(model_and_params()[1], step=0)[name]


@pytest.fixture
def data(tmp_path, monkeypatch):
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  return tmp_path


def test_mmlu_rank_task_scores_are_the_models_likelihoods(data, tmp_path):
  questions = [{"question": r[0], "options": r[1:]} for r in MMLU_ROWS]
  best = [int(np.argmax([log_likelihood(mmlu.prompt("anatomy", q, []), l)
                         for l in mmlu.LETTERS])) for q in questions]
  # The model's best letter is the answer of the first two questions only.
  answers = [mmlu.LETTERS[(b + (i >= 2)) % 4] for i, b in enumerate(best)]
  path = data / "mmlu" / "data" / "val" / "anatomy_val.csv"
  path.parent.mkdir(parents=True)
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows(r + [a] for r, a in zip(MMLU_ROWS, answers))
  got = _evaluate("mmlu_anatomy_0shot_rank", "validation", tmp_path)
  assert got == {"rank_accuracy": pytest.approx(50.0)}


def test_gsm8k_task_scores_the_models_greedy_answers(data, tmp_path):
  predicted = [metrics.final_number(greedy_text(f"Q: {q}\nA:"))
               for q in QUESTIONS]
  # Even questions: the answer is the model's number; odd: another one.
  answers = [f"so #### {int(p)}" if i % 2 == 0 and p is not None else
             str(int(p or 0) + 1) for i, p in enumerate(predicted)]
  hits = sum(i % 2 == 0 and p is not None for i, p in enumerate(predicted))
  assert hits >= 1  # the check below is not 0 == 0
  path = data / "reasoning" / "gsm8k_test.jsonl"
  path.parent.mkdir(parents=True)
  path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                          for q, a in zip(QUESTIONS, answers)))
  got = _evaluate("reasoning_gsm8k_direct", "test", tmp_path)
  assert got == {"number_accuracy": pytest.approx(100.0 * hits / 4)}
