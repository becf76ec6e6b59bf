"""Autoregressive decoding: greedy, temperature / top-k sampling, beam search.

Model-agnostic and jittable. A model enters through

  tokens_to_logits(token_ids <int32>[rows, 1], cache)
      -> (logits <float32>[rows, V], cache)

which runs one cached step (e.g. a `decode=True` call of the models here) on
B rows, or B * W in beam search; the cache is any pytree whose leaves have
a leading [rows] axis, or scalars.
Decoding starts from `start_id` (T5: 0; or one token per row, e.g. the last
token of each row's prompt) and stops at `eos_id`; positions after EOS hold
`pad_id`.

Dimension names (moe_jax's glossary): B batch, W beams, V vocabulary, Ld
decoded length (`max_length`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Cache = Any
TokensToLogits = Callable[[Array, Cache], tuple[Array, Cache]]

NEG_INF = -1.0e9
StartIds = int | Array  # one id for every row, or <int32>[B]


def _start_tokens(start_id: StartIds, batch: int) -> Array:
  """<int32>[B] first input token of each row."""
  return jnp.broadcast_to(jnp.asarray(start_id, jnp.int32), (batch,))


def temperature_sample(tokens_to_logits: TokensToLogits, cache: Cache,
                       batch: int, max_length: int, rng: Array, *,
                       temperature: float = 1.0, top_k: int = 0,
                       eos_id: int = 1, start_id: StartIds = 0,
                       pad_id: int = 0) -> Array:
  """Samples <int32>[B, Ld] tokens.

  temperature 0 (or top_k 1) is greedy decoding. top_k > 0 keeps the k most
  likely tokens before sampling.
  """
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0; got {temperature}")

  def step(state):
    t, last, tokens, done, cache, rng = state
    logits, cache = tokens_to_logits(last[:, None], cache)
    logits = logits.astype(jnp.float32)
    if top_k > 0:
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, NEG_INF, logits)
    rng, key = jax.random.split(rng)
    if temperature == 0:
      chosen = jnp.argmax(logits, axis=-1)
    else:
      chosen = jax.random.categorical(key, logits / temperature, axis=-1)
    chosen = jnp.where(done, pad_id, chosen).astype(jnp.int32)
    tokens = tokens.at[:, t].set(chosen)
    done = done | (chosen == eos_id)
    return t + 1, chosen, tokens, done, cache, rng

  def not_finished(state):
    t, _, _, done, _, _ = state
    return (t < max_length) & ~jnp.all(done)

  init = (0, _start_tokens(start_id, batch),
          jnp.full((batch, max_length), pad_id, jnp.int32),
          jnp.zeros((batch,), bool), cache, rng)
  return jax.lax.while_loop(not_finished, step, init)[2]


def greedy(tokens_to_logits: TokensToLogits, cache: Cache, batch: int,
           max_length: int, **kwargs) -> Array:
  """Greedy decoding: the most likely token at every step."""
  return temperature_sample(tokens_to_logits, cache, batch, max_length,
                            jax.random.PRNGKey(0), temperature=0.0, **kwargs)


def length_penalty(length: Array, alpha: float) -> Array:
  """GNMT length normalization ((5 + length) / 6) ** alpha."""
  return ((5.0 + length) / 6.0) ** alpha


def _per_beam(cache: Cache, beams: int) -> Cache:
  """Repeats every [B, ...] leaf to [B * W, ...]."""
  return jax.tree.map(
      lambda x: x if jnp.ndim(x) == 0 else jnp.repeat(x, beams, axis=0),
      cache)


def _gather_beams(cache: Cache, rows: Array) -> Cache:
  """Reorders [B * W, ...] leaves by flat row indices <int32>[B * W]."""
  return jax.tree.map(
      lambda x: x if jnp.ndim(x) == 0 else jnp.take(x, rows, axis=0), cache)


def beam_search(tokens_to_logits: TokensToLogits, cache: Cache, batch: int,
                max_length: int, beam_size: int, *, alpha: float = 0.6,
                eos_id: int = 1, start_id: StartIds = 0, pad_id: int = 0
                ) -> tuple[Array, Array]:
  """Beam search with length normalization.

  A hypothesis ends at EOS or at max_length; its score is its total log
  probability divided by `length_penalty(length, alpha)`, length counting
  its EOS. Every step keeps the `beam_size` best unfinished hypotheses; the
  result holds the best finished ones.

  Args:
    cache: the model's cache for B rows; repeated per beam (B * W) here.

  Returns:
    tokens <int32>[B, W, Ld] best first (pad_id after EOS) and their scores
    <float32>[B, W].
  """
  k = beam_size
  start = _start_tokens(start_id, batch)[:, None]  # [B, 1]
  flat = lambda x: x.reshape((batch * k,) + x.shape[2:])

  def step(state):
    t, seqs, logprob, fin_seqs, fin_scores, cache = state
    last = jnp.where(t == 0, start, seqs[:, :, jnp.maximum(t - 1, 0)])
    logits, cache = tokens_to_logits(flat(last)[:, None], cache)
    vocab = logits.shape[-1]
    scores = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(
        batch, k, vocab) + logprob[..., None]
    # Step 0: all beams are the same start; keep only the first.
    scores = jnp.where((t == 0) & (jnp.arange(k) > 0)[None, :, None],
                       NEG_INF, scores)
    top_scores, top_index = jax.lax.top_k(scores.reshape(batch, -1), 2 * k)
    beam = top_index // vocab
    token = (top_index % vocab).astype(jnp.int32)
    cand = jnp.take_along_axis(seqs, beam[..., None], axis=1)
    cand = cand.at[:, :, t].set(token)
    ends = (token == eos_id) | (t == max_length - 1)
    # Finished candidates join the finished set, scored by length.
    normed = top_scores / length_penalty(t + 1.0, alpha)
    normed = jnp.where(ends & (top_scores > NEG_INF / 2), normed, NEG_INF)
    all_seqs = jnp.concatenate([fin_seqs, cand], axis=1)
    all_scores = jnp.concatenate([fin_scores, normed], axis=1)
    best, index = jax.lax.top_k(all_scores, k)
    fin_seqs = jnp.take_along_axis(all_seqs, index[..., None], axis=1)
    # Unfinished candidates: the best k stay alive.
    alive_scores = jnp.where(ends, NEG_INF, top_scores)
    alive_logprob, alive_index = jax.lax.top_k(alive_scores, k)
    seqs = jnp.take_along_axis(cand, alive_index[..., None], axis=1)
    parent = jnp.take_along_axis(beam, alive_index, axis=1)
    rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
    return t + 1, seqs, alive_logprob, fin_seqs, best, _gather_beams(
        cache, rows)

  init = (0, jnp.full((batch, k, max_length), pad_id, jnp.int32),
          jnp.zeros((batch, k), jnp.float32),
          jnp.full((batch, k, max_length), pad_id, jnp.int32),
          jnp.full((batch, k), NEG_INF, jnp.float32), _per_beam(cache, k))
  state = jax.lax.fori_loop(0, max_length, lambda _, s: step(s), init)
  return state[3], state[4]
