"""moe_jax models with T5X's module contracts.

T5X's `EncoderDecoderModel` / `DecoderOnlyModel` call the module and expect
logits; moe_jax models return `ModelOutput(logits, moe_stats)`. These
subclasses return logits only. The routing statistics are not lost: every
MoE layer also sows them into `intermediates`, where T5X's MoE model reads
them. Parameters are identical to the wrapped models' (same tree), so
moe_jax checkpoints load unchanged.

Dimension names: B batch, Le encoder length, Ld decoder length, D width,
V vocabulary.
"""

from __future__ import annotations

from typing import Optional

import jax

from moe_jax.models.decoder_only import DecoderOnly
from moe_jax.models.t5 import EncoderDecoder

Array = jax.Array


class T5XEncoderDecoder(EncoderDecoder):
  """`EncoderDecoder` whose `encode`, `decode` and `__call__` return arrays."""

  def encode(self, encoder_input_tokens: Array,
             encoder_segment_ids: Optional[Array] = None,
             encoder_positions: Optional[Array] = None, *,
             enable_dropout: bool = True) -> Array:
    """<int32>[B, Le] -> encoded <[B, Le, D]>."""
    encoded, _ = super().encode(encoder_input_tokens, encoder_segment_ids,
                                encoder_positions,
                                enable_dropout=enable_dropout)
    return encoded

  def decode(self, encoded: Array, encoder_input_tokens: Array,
             decoder_input_tokens: Array,
             decoder_target_tokens: Optional[Array] = None,
             encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None,
             decoder_positions: Optional[Array] = None, *,
             enable_dropout: bool = True, decode: bool = False,
             max_decode_length: Optional[int] = None) -> Array:
    """Logits <float32>[B, Ld, V]; decode=True uses the `cache` collection."""
    logits, _ = super().decode(
        encoded, encoder_input_tokens, decoder_input_tokens,
        decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
        decoder_positions, enable_dropout=enable_dropout, decode=decode,
        max_decode_length=max_decode_length)
    return logits

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array,
               encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               decoder_positions: Optional[Array] = None, *,
               enable_dropout: bool = True, decode: bool = False) -> Array:
    """Logits <float32>[B, Ld, V]."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids,
                          encoder_positions, enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids,
                       decoder_segment_ids, decoder_positions,
                       enable_dropout=enable_dropout, decode=decode)


class T5XDecoderOnly(DecoderOnly):
  """`DecoderOnly` whose `__call__` returns logits <float32>[B, L, V]."""

  def __call__(self, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               decoder_positions: Optional[Array] = None,
               decoder_causal_attention: Optional[Array] = None, *,
               enable_dropout: bool = True, decode: bool = False,
               prefill: bool = False,
               prefill_lengths: Optional[Array] = None) -> Array:
    return super().__call__(
        decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
        decoder_positions, decoder_causal_attention,
        enable_dropout=enable_dropout, decode=decode, prefill=prefill,
        prefill_lengths=prefill_lengths).logits
