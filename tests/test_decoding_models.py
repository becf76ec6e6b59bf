"""Decoding the real models with their own caches (encoder-decoder and
prefix-LM decoder-only, unrolled and scanned layers) against full-sequence
passes without a cache: iterated argmax, exhaustive scoring, sampling from
full-sequence logits."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import (Architecture, MoeConfig, TransformerConfig,
                            build_model, decoding, generation)
from moe_jax.models.config import PositionEmbedding
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter

EOS = 1
LENGTH = 3  # Lt
VOCAB = 4  # beam search over all VOCAB ** LENGTH sequences
# Rows: different prompt lengths; 3 rows against 3 scanned layers would hide
# a cache leaf repeated on the layer axis, so 2.
INPUTS = np.array([[2, 3, 2, EOS], [3, EOS, 0, 0]], np.int32)


def config(architecture: str, scan: bool, vocab: int) -> TransformerConfig:
  """Tiny sparse model; 3 decoder layers (3 blocks when scanned)."""
  # Capacity for every token, so routing a step alone or in a full pass
  # gives the same expert outputs.
  moe = MoeConfig(layer=MoeLayer(
      router=TokenChoiceRouter(num_selected_experts=2), num_experts=4,
      eval_capacity_factor=16.0, min_expert_capacity=16), sparse_every=1)
  common = dict(vocab_size=vocab, emb_dim=16, num_heads=2, head_dim=8,
                mlp_dim=32, num_decoder_layers=3, decoder_moe=moe,
                scan_layers=scan)
  if architecture == "encoder_decoder":
    return TransformerConfig(num_encoder_layers=1, encoder_moe=moe, **common)
  return TransformerConfig(architecture=Architecture.DECODER_ONLY,
                           position_embedding=PositionEmbedding.ROPE,
                           **common)


class Case:
  """A model with params, its cached decoder, and full-sequence logits."""

  def __init__(self, architecture: str, scan: bool):
    self.config = config(architecture, scan, VOCAB)
    self.model = build_model(self.config)
    self.decoder_only = architecture == "decoder_only"
    dummy = jnp.zeros((2, LENGTH), jnp.int32)
    args = (dummy,) if self.decoder_only else (INPUTS, dummy, dummy)
    self.params = jax.jit(lambda key: self.model.init(
        key, *args, enable_dropout=False)["params"])(jax.random.PRNGKey(1))
    self.log_probs = jax.jit(self._log_probs)

  def decoder(self, inputs) -> generation.Decoder:
    if self.decoder_only:
      tokens, causal = generation.prefix_lm_prompt(inputs, LENGTH)
      return generation.decoder_only(self.model, self.params, tokens, causal)
    return generation.encoder_decoder(self.model, self.params, inputs,
                                      LENGTH)

  def _log_probs(self, inputs, decoded):
    """<float32>[R, Lt, V] next-token log-probabilities after each prefix
    of `decoded` <int32>[R, Lt], without a cache; `inputs` <int32>[R, Li]."""
    shifted = jnp.pad(decoded[:, :-1], ((0, 0), (1, 0)))
    if self.decoder_only:
      tokens, causal = generation.prefix_lm_prompt(inputs, LENGTH)
      n = jnp.sum(causal, axis=1)  # where the first decoded token is fed
      at = n[:, None] - 1 + jnp.arange(LENGTH)
      rows = jnp.arange(len(inputs))[:, None]
      tokens = tokens.at[rows, at].set(
          jnp.where(jnp.arange(LENGTH) == 0, tokens[rows, at], shifted))
      logits = self.model.apply({"params": self.params}, tokens,
                                decoder_causal_attention=causal,
                                enable_dropout=False).logits
      logits = jnp.take_along_axis(logits, at[..., None], axis=1)
    else:
      logits = self.model.apply({"params": self.params}, inputs, shifted,
                                jnp.ones_like(shifted),
                                enable_dropout=False).logits
    return jax.nn.log_softmax(logits)


@functools.cache
def case(architecture: str, scan: bool) -> Case:
  return Case(architecture, scan)


MODELS = [(a, s) for a in ("encoder_decoder", "decoder_only")
          for s in (False, True)]


def until_eos(row) -> list[int]:
  row = list(np.asarray(row))
  return row[:row.index(EOS) + 1] if EOS in row else row


def iterated(c: Case, choose) -> np.ndarray:
  """<int32>[2, Lt]: token t = choose(t, full-sequence logits after the
  tokens before it); pad after EOS."""
  out = np.zeros((2, LENGTH), np.int32)
  for t in range(LENGTH):
    step = np.asarray(choose(t, c.log_probs(INPUTS, out)[:, t]))
    out[:, t] = np.where((out[:, :t] == EOS).any(1), 0, step)
  return out


@pytest.mark.parametrize("architecture,scan", MODELS)
def test_greedy_and_sampling_with_the_cache_follow_full_sequence_logits(
    architecture, scan):
  c = case(architecture, scan)
  rng, temperature = jax.random.PRNGKey(7), 1.5

  @functools.partial(jax.jit, static_argnums=0)
  def sample(temperature):
    return c.decoder(INPUTS).run(decoding.temperature_sample, LENGTH,
                                 rng=rng, temperature=temperature,
                                 eos_id=EOS)

  greedy = jax.jit(lambda: c.decoder(INPUTS).run(decoding.greedy, LENGTH,
                                                  eos_id=EOS))()
  want = iterated(c, lambda t, logits: jnp.argmax(logits, -1))
  np.testing.assert_array_equal(greedy, want)
  assert any(len(until_eos(r)) > 1 for r in want)  # not all EOS at once
  # temperature_sample splits its key once per step: the same draws from
  # the full-sequence logits.
  keys = []
  for _ in range(LENGTH):
    rng, key = jax.random.split(rng)
    keys.append(key)
  rng = jax.random.PRNGKey(7)
  want = iterated(c, lambda t, logits: jax.random.categorical(
      keys[t], logits / temperature))
  np.testing.assert_array_equal(sample(temperature), want)
  np.testing.assert_array_equal(sample(1e-4), greedy)


@pytest.mark.parametrize("architecture,scan", MODELS)
def test_beam_search_with_the_cache_is_exhaustive_search(architecture,
                                                         scan):
  alpha = 0.6
  c = case(architecture, scan)
  seqs, scores = jax.jit(lambda: c.decoder(INPUTS).run(
      decoding.beam_search, LENGTH, beam_size=VOCAB ** LENGTH, alpha=alpha,
      eos_id=EOS))()
  every = np.array(list(itertools.product(range(VOCAB), repeat=LENGTH)),
                   np.int32)
  for b in range(2):
    log_probs = c.log_probs(np.repeat(INPUTS[b:b + 1], len(every), 0), every)
    on_token = np.take_along_axis(np.asarray(log_probs), every[..., None],
                                  -1)[..., 0]
    hypotheses = {}
    for seq, row in zip(every, on_token):
      kept = until_eos(seq)
      hypotheses[tuple(kept)] = row[:len(kept)].sum() / (
          decoding.length_penalty(len(kept), alpha))
    best = sorted(hypotheses.items(), key=lambda kv: -kv[1])
    for rank in range(6):
      seq, score = best[rank]
      np.testing.assert_allclose(scores[b, rank], score, rtol=1e-4,
                                 atol=1e-5)
      assert tuple(until_eos(seqs[b, rank])) == seq
