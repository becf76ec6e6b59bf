"""T5 v1.1 encoder-decoder, dense or sparse, with T5X's call signatures.

Dimension names (moe_jax's glossary): B batch, Le encoder length, Ld decoder
length, D model width, V vocabulary.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax

from moe_jax.moe.layer import MoeStats
from moe_jax.models import masks
from moe_jax.models.blocks import Stack
from moe_jax.models.config import TransformerConfig
from moe_jax.models.embedding import EmbeddingAndLogits
from moe_jax.models.outputs import ModelOutput, concat_stats

Array = jax.Array


class EncoderDecoder(nn.Module):
  """Encoder and decoder share the token embedding (T5)."""
  config: TransformerConfig

  def setup(self):
    self.embedder = EmbeddingAndLogits(self.config)
    self.encoder = Stack(self.config, "encoder")
    self.decoder = Stack(self.config, "decoder")
    self.embed_dropout = nn.Dropout(self.config.dropout_rate,
                                    broadcast_dims=(-2,))

  def encode(self, encoder_input_tokens: Array,
             encoder_segment_ids: Optional[Array] = None,
             encoder_positions: Optional[Array] = None, *,
             enable_dropout: bool = True) -> tuple[Array, Optional[MoeStats]]:
    """<int32>[B, Le] tokens -> (<[B, Le, D]> encoded, encoder MoE stats)."""
    real = masks.real_tokens(encoder_input_tokens, encoder_segment_ids)
    x = self.embed_dropout(self.embedder.embed(encoder_input_tokens),
                           deterministic=not enable_dropout)
    return self.encoder(
        x, positions=masks.positions_or_default(encoder_input_tokens, encoder_positions),
        attention_mask=masks.attention_mask(real, real, encoder_segment_ids,
                                            encoder_segment_ids),
        token_ids=encoder_input_tokens, token_mask=real,
        deterministic=not enable_dropout)

  def decode(self, encoded: Array, encoder_input_tokens: Array,
             decoder_input_tokens: Array,
             decoder_target_tokens: Optional[Array] = None,
             encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None,
             decoder_positions: Optional[Array] = None, *,
             enable_dropout: bool = True, decode: bool = False,
             max_decode_length: Optional[int] = None
             ) -> tuple[Array, Optional[MoeStats]]:
    """Decoder logits <float32>[B, Ld, V] given the encoder output.

    With decode=True and Ld = 1 this is one cached step (the cache must have
    been created by a full-length call with decode=True, e.g. at init).
    `max_decode_length` is accepted for T5X compatibility; the cache length
    is the length of the call that created it.
    """
    del max_decode_length
    tokens = decoder_input_tokens
    real = masks.decoder_real_tokens(tokens, decoder_segment_ids,
                                     decoder_target_tokens, decode)
    encoder_real = masks.real_tokens(encoder_input_tokens, encoder_segment_ids)
    self_mask = masks.causal_mask(tokens.shape[1]) & masks.attention_mask(
        real, real, decoder_segment_ids, decoder_segment_ids)
    x = self.embed_dropout(self.embedder.embed(tokens),
                           deterministic=not enable_dropout)
    x, stats = self.decoder(
        x, positions=masks.positions_or_default(tokens, decoder_positions),
        attention_mask=self_mask, token_ids=tokens, token_mask=real,
        encoded=encoded,
        cross_mask=masks.attention_mask(real, encoder_real,
                                        decoder_segment_ids,
                                        encoder_segment_ids),
        deterministic=not enable_dropout, decode=decode)
    return self.embedder.logits(x), stats

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array,
               encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               decoder_positions: Optional[Array] = None, *,
               enable_dropout: bool = True, decode: bool = False
               ) -> ModelOutput:
    # This class's own encode/decode: a subclass (the T5X adapter) overrides
    # them to return arrays without the stats.
    encoded, encoder_stats = EncoderDecoder.encode(
        self, encoder_input_tokens, encoder_segment_ids, encoder_positions,
        enable_dropout=enable_dropout)
    logits, decoder_stats = EncoderDecoder.decode(
        self, encoded, encoder_input_tokens, decoder_input_tokens,
        decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
        decoder_positions, enable_dropout=enable_dropout, decode=decode)
    return ModelOutput(logits, concat_stats(encoder_stats, decoder_stats))
