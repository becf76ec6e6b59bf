"""Decoding algorithms against brute force, and with a real cached model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import (MoeConfig, TransformerConfig, build_model,
                            decoding)
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter

VOCAB, EOS = 4, 1
TABLE = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (3, VOCAB, VOCAB))
                   * 2.0)


def toy_model(ids, state):
  """Logits depend on the last token and a cache state (sum of tokens % 3),
  so beams must carry their own cache."""
  last = ids[:, 0]
  logits = jnp.asarray(TABLE)[state, last]
  return logits, (state + last) % 3


def log_softmax(x):
  return x - np.log(np.exp(x - x.max()).sum()) - x.max()


def brute_force(state, max_length, alpha):
  """Every hypothesis (ends at EOS or max_length) with its score."""
  results = []
  for length in range(1, max_length + 1):
    for seq in itertools.product(range(VOCAB), repeat=length):
      if EOS in seq[:-1] or (length < max_length and seq[-1] != EOS):
        continue
      s, last, total = state, 0, 0.0
      for token in seq:
        total += log_softmax(TABLE[s, last])[token]
        s, last = (s + last) % 3, token
      results.append((total / ((5 + length) / 6) ** alpha, seq))
  return sorted(results, reverse=True)


def test_greedy_follows_the_argmax_path():
  states = jnp.array([0, 1, 2])
  tokens = np.asarray(decoding.greedy(toy_model, states, 3, 5, eos_id=EOS))
  for b, state in enumerate([0, 1, 2]):
    last, want = 0, []
    for _ in range(5):
      token = int(np.argmax(TABLE[state, last]))
      want.append(token)
      state, last = (state + last) % 3, token
      if token == EOS:
        break
    np.testing.assert_array_equal(tokens[b, :len(want)], want)
    assert (tokens[b, len(want):] == 0).all()


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_finds_the_brute_force_best(alpha):
  states = jnp.array([0, 2])
  seqs, scores = jax.jit(lambda s: decoding.beam_search(
      toy_model, s, 2, 3, beam_size=VOCAB ** 3, alpha=alpha,
      eos_id=EOS))(states)
  for b, state in enumerate([0, 2]):
    want = brute_force(state, 3, alpha)
    for rank in range(5):
      score, seq = want[rank]
      np.testing.assert_allclose(scores[b, rank], score, rtol=1e-5)
      np.testing.assert_array_equal(seqs[b, rank, :len(seq)], seq)


def test_small_beam_never_beats_exhaustive_search():
  states = jnp.array([1])
  _, scores = decoding.beam_search(toy_model, states, 1, 4, beam_size=2,
                                   eos_id=EOS)
  best = brute_force(1, 4, 0.6)[0][0]
  assert float(scores[0, 0]) <= best + 1e-5
  assert float(scores[0, 0]) >= float(scores[0, 1])


def test_zero_temperature_and_top1_sampling_are_greedy():
  states = jnp.array([0, 1, 2])
  greedy = decoding.greedy(toy_model, states, 3, 5, eos_id=EOS)
  for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=1)):
    sampled = decoding.temperature_sample(
        toy_model, states, 3, 5, jax.random.PRNGKey(3), eos_id=EOS, **kwargs)
    np.testing.assert_array_equal(sampled, greedy)


def test_sampling_follows_the_model_distribution():
  n = 4000
  tokens = decoding.temperature_sample(
      toy_model, jnp.zeros((n,), jnp.int32), n, 1, jax.random.PRNGKey(0),
      eos_id=EOS)
  freq = np.bincount(np.asarray(tokens[:, 0]), minlength=VOCAB) / n
  probs = np.exp(log_softmax(TABLE[0, 0]))
  np.testing.assert_allclose(freq, probs, atol=0.03)
  top2 = decoding.temperature_sample(
      toy_model, jnp.zeros((n,), jnp.int32), n, 1, jax.random.PRNGKey(1),
      eos_id=EOS, top_k=2)
  allowed = set(np.argsort(-TABLE[0, 0])[:2].tolist())
  assert set(np.unique(np.asarray(top2)).tolist()) <= allowed


def test_decoding_a_real_model_with_its_cache():
  moe = MoeConfig(layer=MoeLayer(
      router=TokenChoiceRouter(num_selected_experts=2), num_experts=4,
      eval_capacity_factor=8.0, min_expert_capacity=1))
  config = TransformerConfig(
      vocab_size=20, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
      num_encoder_layers=2, num_decoder_layers=2, encoder_moe=moe,
      decoder_moe=moe)
  model = build_model(config)
  inputs = np.array([[5, 6, 7, 1], [8, 9, 1, 0]], np.int32)
  length = 6
  dummy = np.zeros((2, length), np.int32)
  variables = model.init(jax.random.PRNGKey(0), inputs, dummy, dummy,
                         enable_dropout=False, decode=True)
  params, cache = variables["params"], variables["cache"]
  encoded, _ = model.apply({"params": params}, inputs, enable_dropout=False,
                           method="encode")

  def tokens_to_logits(ids, cache):
    (logits, _), state = model.apply(
        {"params": params, "cache": cache}, encoded, inputs, ids,
        enable_dropout=False, decode=True, method="decode",
        mutable=["cache"])
    return logits[:, 0], state["cache"]

  out = jax.jit(lambda c: decoding.greedy(tokens_to_logits, c, 2, length,
                                          eos_id=1))(cache)
  # Teacher-forcing the greedy output reproduces it as the argmax.
  decoder_inputs = np.concatenate([np.zeros((2, 1), np.int32),
                                   np.asarray(out)[:, :-1]], axis=1)
  logits = model.apply({"params": params}, inputs, decoder_inputs,
                       np.ones_like(decoder_inputs),
                       enable_dropout=False).logits
  argmax = np.asarray(jnp.argmax(logits, -1))
  for b in range(2):
    row = np.asarray(out[b])
    end = (list(row).index(1) + 1) if 1 in row else length
    np.testing.assert_array_equal(row[:end], argmax[b, :end])


def test_evaluator_decoding_from_a_zero_filled_cache():
  """The evaluator builds the cache abstractly and zero-fills it; greedy
  decoding must still follow the teacher-forced argmax path."""
  from moe_jax.train.evaluation import ModelFns
  config = TransformerConfig(
      vocab_size=20, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
      num_encoder_layers=2, num_decoder_layers=2)
  length = 6
  fns = ModelFns(config, "enc_dec", length)
  inputs = np.array([[5, 6, 7, 1], [8, 9, 1, 0]], np.int32)
  dummy = np.zeros((2, length), np.int32)
  params = fns.model.init(jax.random.PRNGKey(1), inputs, dummy, dummy,
                          enable_dropout=False)["params"]
  out = np.asarray(fns.predict_batch(params,
                                     {"encoder_input_tokens": inputs}))
  decoder_inputs = np.concatenate([np.zeros((2, 1), np.int32), out[:, :-1]],
                                  axis=1)
  logits = fns.model.apply({"params": params}, inputs, decoder_inputs,
                           np.ones_like(decoder_inputs),
                           enable_dropout=False).logits
  argmax = np.asarray(jnp.argmax(logits, -1))
  for b in range(2):
    end = (list(out[b]).index(1) + 1) if 1 in out[b] else length
    np.testing.assert_array_equal(out[b, :end], argmax[b, :end])
