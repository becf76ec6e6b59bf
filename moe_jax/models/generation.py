"""moe_jax's models ready for `moe_jax.models.decoding`: a cached step
function, the model's own cache, and each row's first token.

* Encoder-decoder: the inputs are encoded once; decoding starts from token 0
  with an empty self-attention cache.
* Decoder-only: the prompt fills the cache in one pass (prefill) and decoding
  continues after it, so the decoded tokens are the continuation alone. The
  prompt has the prefix-LM layout of `seqio.PrefixLMFeatureConverter`:
  decoder input tokens [0, x1 .. xn, ...] with `decoder_causal_attention` 1
  on the n + 1 prompt positions (`prefix_lm_prompt` builds it from inputs).

Dimension names (moe_jax's glossary): B batch, Li input length, Lt decoded
length, L decoder length (Li + Lt for a decoder-only prompt), V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.models.decoding import TokensToLogits

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Decoder:
  """One batch ready to decode.

  Attributes:
    tokens_to_logits: one cached step (`moe_jax.models.decoding`).
    cache: the model's cache for the B rows (batch-first leaves).
    start_ids: <int32>[B] the first token each row feeds.
  """
  tokens_to_logits: TokensToLogits
  cache: Any
  start_ids: Array

  def run(self, algorithm: Callable[..., Any], max_length: int, **kwargs):
    """`algorithm` (decoding.greedy, temperature_sample, beam_search) over
    Lt = `max_length` new tokens; kwargs go to it."""
    return algorithm(self.tokens_to_logits, self.cache,
                     self.start_ids.shape[0], max_length,
                     start_id=self.start_ids, **kwargs)


def encoder_decoder(model: nn.Module, params: Any,
                    encoder_input_tokens: Array, max_length: int,
                    model_state: Optional[Mapping[str, Any]] = None
                    ) -> Decoder:
  """Encodes <int32>[B, Li] inputs; the cache holds Lt = `max_length`
  decoder steps. `model_state`: the model's non-gradient collections
  (`TrainState.model_state`), read, never updated."""
  variables = {"params": params, **(model_state or {})}
  inputs = encoder_input_tokens
  dummy = jnp.zeros((inputs.shape[0], max_length), jnp.int32)
  # Only the shapes of the cache come from init; its steps start at 0.
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), inputs, dummy, dummy, enable_dropout=False,
      decode=True))["cache"]
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  encoded, _ = model.apply(variables, inputs, enable_dropout=False,
                           method="encode")

  def tokens_to_logits(ids, cache):
    # Beam search runs W rows per example, beams of one example together.
    beams = ids.shape[0] // inputs.shape[0]
    (logits, _), state = model.apply(
        {**variables, "cache": cache},
        jnp.repeat(encoded, beams, axis=0), jnp.repeat(inputs, beams, axis=0),
        ids, enable_dropout=False, decode=True, method="decode",
        mutable=["cache"])
    return logits[:, 0], state["cache"]

  return Decoder(tokens_to_logits, cache, jnp.zeros((inputs.shape[0],),
                                                    jnp.int32))


def decoder_only(model: nn.Module, params: Any, decoder_input_tokens: Array,
                 decoder_causal_attention: Array,
                 model_state: Optional[Mapping[str, Any]] = None) -> Decoder:
  """Fills the cache with the prompt of <int32>[B, L] decoder inputs
  (`model_state` as in `encoder_decoder`).

  The prompt is where `decoder_causal_attention` <[B, L]> is 1 (the start
  token and n input tokens; bidirectional, as in training). The cache has
  the L positions; decoding feeds the last prompt token x_n again at its
  position n (same result as the prefill there), so the first decoded token
  is the model's prediction after the prompt and at most L - n tokens fit.
  """
  prompt = decoder_causal_attention.astype(jnp.int32)
  # A row without prompt (batch padding) starts at position 0.
  last = jnp.maximum(jnp.sum(prompt, axis=1) - 1, 0)
  variables = {"params": params, **(model_state or {})}
  _, state = model.apply(
      variables, decoder_input_tokens * prompt,
      # Segment 1 = the prompt: positions after it are neither attended to
      # nor routed; decoding overwrites their cache entries.
      decoder_segment_ids=prompt, decoder_causal_attention=prompt,
      enable_dropout=False, decode=True, prefill=True,
      prefill_lengths=last, mutable=["cache"])

  def tokens_to_logits(ids, cache):
    out, state = model.apply({**variables, "cache": cache}, ids,
                             enable_dropout=False, decode=True,
                             mutable=["cache"])
    return out.logits[:, 0], state["cache"]

  start = jnp.take_along_axis(decoder_input_tokens, last[:, None], 1)[:, 0]
  return Decoder(tokens_to_logits, state["cache"], start.astype(jnp.int32))


def prefix_lm_prompt(inputs: Array, max_length: int) -> tuple[Array, Array]:
  """`seqio.PrefixLMFeatureConverter`'s prompt features of inputs.

  Args:
    inputs: <int32>[B, Li] token ids padded with 0 (each ends with EOS).
    max_length: Lt, the tokens to decode after the prompt.

  Returns:
    decoder_input_tokens <int32>[B, Li + Lt] = [0, inputs, 0 ...] and
    decoder_causal_attention <int32>[B, Li + Lt], 1 on the start token and
    the inputs.
  """
  batch, length = inputs.shape
  tokens = jnp.zeros((batch, length + max_length), jnp.int32)
  tokens = tokens.at[:, 1:length + 1].set(inputs)
  count = jnp.sum(inputs > 0, axis=1) + 1
  causal = (jnp.arange(length + max_length)[None, :] < count[:, None])
  return tokens, causal.astype(jnp.int32)
