"""Decoder-only language model: causal LM or prefix-LM, dense or sparse.

A prefix-LM (GLaM-style) marks its inputs with `decoder_causal_attention`
(1 on the prefix): prefix tokens attend to each other in both directions,
everything else is causal. With RoPE, SwiGLU experts and renormalized top-2
routing (gin) this is the Mixtral-style variant.

Dimension names (moe_jax's glossary): B batch, L length, V vocabulary.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax

from moe_jax.models import masks
from moe_jax.models.blocks import Stack
from moe_jax.models.config import TransformerConfig
from moe_jax.models.embedding import EmbeddingAndLogits
from moe_jax.models.outputs import ModelOutput

Array = jax.Array


class DecoderOnly(nn.Module):
  config: TransformerConfig

  def setup(self):
    self.embedder = EmbeddingAndLogits(self.config)
    self.decoder = Stack(self.config, "decoder")
    self.embed_dropout = nn.Dropout(self.config.dropout_rate,
                                    broadcast_dims=(-2,))

  def __call__(self, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               decoder_positions: Optional[Array] = None,
               decoder_causal_attention: Optional[Array] = None, *,
               enable_dropout: bool = True, decode: bool = False,
               prefill: bool = False,
               prefill_lengths: Optional[Array] = None) -> ModelOutput:
    """Logits <float32>[B, L, V] for <int32>[B, L] input tokens.

    decode=True with L = 1 runs one cached step. decode=True with the full
    cache length (and prefill=True) fills the cache from a prompt; decoding
    then continues at `prefill_lengths` <int32>[B] (the prompt lengths).
    """
    tokens = decoder_input_tokens
    real = masks.decoder_real_tokens(tokens, decoder_segment_ids,
                                     decoder_target_tokens, decode)
    if prefill and prefill_lengths is None:
      raise ValueError("prefill=True needs prefill_lengths")
    self_mask = masks.causal_mask(
        tokens.shape[1], decoder_causal_attention) & masks.attention_mask(
            real, real, decoder_segment_ids, decoder_segment_ids)
    positions = masks.positions_or_default(tokens, decoder_positions)
    x = self.embed_dropout(self.embedder.embed(tokens),
                           deterministic=not enable_dropout)
    x, stats = self.decoder(
        x, positions=positions, attention_mask=self_mask, token_ids=tokens,
        token_mask=real, deterministic=not enable_dropout, decode=decode,
        prefill_lengths=prefill_lengths if prefill else None)
    return ModelOutput(self.embedder.logits(x), stats)
