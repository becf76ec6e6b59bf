"""Hugging Face T5 v1.1 (dense) weights <-> moe_jax parameters.

  config = config_from_hf(hf_model.config)
  params = import_t5(hf_model.state_dict(), config)   # or a safetensors dict
  state_dict = export_t5(params, config)              # numpy arrays

The attention, embedding and norm mapping (query rescaling, relative-bias
tables) is `moe_jax.interop.hf_common`'s. Only untied output embeddings
(T5 v1.1, `tie_word_embeddings=False`) and the gated-gelu FFN are mapped.
Sparse checkpoints: `moe_jax.interop.hf_switch` (SwitchTransformers).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from moe_jax.interop import hf_common
from moe_jax.models.config import TransformerConfig


def config_from_hf(hf_config: Any) -> TransformerConfig:
  """A moe_jax `TransformerConfig` equal to a HF `T5Config` (v1.1)."""
  if getattr(hf_config, "feed_forward_proj", "") != "gated-gelu":
    raise ValueError("feed_forward_proj must be 'gated-gelu' (T5 v1.1); got "
                     f"{hf_config.feed_forward_proj!r}")
  if hf_config.tie_word_embeddings:
    raise ValueError("tie_word_embeddings must be False (T5 v1.1)")
  # Newer transformers scale decoder outputs by d_model^-0.5 under this flag
  # (older ones did so exactly when embeddings were tied).
  if getattr(hf_config, "scale_decoder_outputs", False):
    raise ValueError("scale_decoder_outputs must be False (T5 v1.1)")
  hf_common.check_layer_norm_epsilon(hf_config)
  return TransformerConfig(
      vocab_size=hf_config.vocab_size, emb_dim=hf_config.d_model,
      num_heads=hf_config.num_heads, head_dim=hf_config.d_kv,
      mlp_dim=hf_config.d_ff, num_encoder_layers=hf_config.num_layers,
      num_decoder_layers=hf_config.num_decoder_layers,
      relative_attention_num_buckets=(
          hf_config.relative_attention_num_buckets),
      relative_attention_max_distance=(
          hf_config.relative_attention_max_distance))


def _pairs(config: TransformerConfig) -> Iterator[hf_common.Pair]:
  if config.encoder_moe or config.decoder_moe:
    raise ValueError("encoder_moe / decoder_moe must be None: only dense T5 "
                     "is mapped")
  if config.logits_via_embedding:
    raise ValueError("logits_via_embedding must be False (T5 v1.1)")

  def ffn(stack, i, ours, hf):
    del stack, i
    for w in ("wi_0", "wi_1", "wo"):
      yield ours + ("mlp", w), f"{hf}.DenseReluDense.{w}.weight", "t"

  return hf_common.pairs(config, ffn)


def import_t5(state_dict: Mapping[str, Any],
              config: TransformerConfig) -> dict[str, Any]:
  """moe_jax `params` (nested dict of float32 arrays) from a HF T5 state dict
  (torch tensors or numpy arrays, e.g. `safetensors.numpy.load_file`)."""
  return hf_common.import_params(state_dict, _pairs(config), config)


def export_t5(params: Mapping[str, Any],
              config: TransformerConfig) -> dict[str, np.ndarray]:
  """HF T5 state dict (numpy float32) from moe_jax `params`."""
  return hf_common.export_params(params, _pairs(config), config)
