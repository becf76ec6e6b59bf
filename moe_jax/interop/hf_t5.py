"""Hugging Face T5 v1.1 (dense, gated-gelu) weights <-> moe_jax parameters.

  config = config_from_hf(hf_model.config)
  params = import_t5(hf_common.load_safetensors(model_dir), config)
  hf_common.save_safetensors(export_t5(params, config), "out.safetensors")

The attention, embedding and norm mapping (query rescaling, relative-bias
tables) and the import checks are `moe_jax.interop.hf_common`'s. Sparse
checkpoints: `moe_jax.interop.hf_switch` (SwitchTransformers).

The output layer. transformers < 5 reads `tie_word_embeddings` as "tie the
LM head to `shared` and scale decoder outputs by d_model^-0.5" (original
T5); False (T5 v1.1, FLAN-T5) gives a separate, unscaled head. transformers
5 always ties the head (`tie_word_embeddings` is forced True) and reads the
scaling from `scale_decoder_outputs` (False for v1.1), and saves no
`lm_head.weight`. So: scaled -> `logits_via_embedding=True`; unscaled -> a
separate moe_jax head, read from `lm_head.weight` (a checkpoint saved with a
separate head) or, when the state dict has none, from `shared.weight`.
An exported unscaled model loads into transformers 5 with its head tied to
`shared`: a head fine-tuned apart from the embedding needs transformers < 5.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any, Iterator, Mapping

import numpy as np

from moe_jax.interop import hf_common
from moe_jax.models.config import TransformerConfig


def _scales_decoder_outputs(hf_config: Any) -> bool:
  """Whether HF multiplies the decoder output by d_model^-0.5 before the LM
  head, read as the installed transformers means the config (see above)."""
  if int(metadata.version("transformers").split(".")[0]) >= 5:
    return bool(hf_config.scale_decoder_outputs)
  return bool(hf_config.tie_word_embeddings)


def config_from_hf(hf_config: Any) -> TransformerConfig:
  """A moe_jax `TransformerConfig` equal to a HF `T5Config` (v1.1)."""
  hf_common.check_model_type(hf_config, "t5", "moe_jax.interop.hf_t5")
  if getattr(hf_config, "feed_forward_proj", "") != "gated-gelu":
    raise ValueError("feed_forward_proj must be 'gated-gelu' (T5 v1.1); got "
                     f"{hf_config.feed_forward_proj!r}")
  return TransformerConfig(
      vocab_size=hf_config.vocab_size, emb_dim=hf_config.d_model,
      num_heads=hf_config.num_heads, head_dim=hf_config.d_kv,
      mlp_dim=hf_config.d_ff, num_encoder_layers=hf_config.num_layers,
      num_decoder_layers=hf_config.num_decoder_layers,
      norm_epsilon=hf_config.layer_norm_epsilon,
      logits_via_embedding=_scales_decoder_outputs(hf_config),
      relative_attention_num_buckets=(
          hf_config.relative_attention_num_buckets),
      relative_attention_max_distance=(
          hf_config.relative_attention_max_distance))


def _pairs(config: TransformerConfig) -> Iterator[hf_common.Pair]:
  if config.encoder_moe or config.decoder_moe:
    raise ValueError("encoder_moe / decoder_moe must be None: only dense T5 "
                     "is mapped")

  def ffn(stack, i, ours, hf):
    del stack, i
    for w in ("wi_0", "wi_1", "wo"):
      yield ours + ("mlp", w), f"{hf}.DenseReluDense.{w}.weight", "t"

  return hf_common.pairs(config, ffn)


def import_t5(state_dict: Mapping[str, Any], config: TransformerConfig, *,
              allow_non_finite: bool = False) -> dict[str, Any]:
  """moe_jax `params` (nested dict of float32 arrays) from a HF T5 state dict
  (torch tensors or numpy arrays, e.g. `hf_common.load_safetensors`).

  Raises KeyError / ValueError naming the key for missing, left-over,
  mis-shaped or (unless `allow_non_finite`) non-finite weights.
  """
  if not config.logits_via_embedding and "lm_head.weight" not in state_dict:
    # Saved by transformers 5: the unscaled head is `shared` itself.
    state_dict = {**state_dict, "lm_head.weight": state_dict["shared.weight"]}
  return hf_common.import_params(state_dict, _pairs(config), config,
                                 copies=hf_common.t5_copies(config),
                                 allow_non_finite=allow_non_finite)


def export_t5(params: Mapping[str, Any],
              config: TransformerConfig) -> dict[str, np.ndarray]:
  """HF T5 state dict (numpy float32) from moe_jax `params`, with
  `lm_head.weight` (tied: a copy of `shared.weight`)."""
  return hf_common.export_params(params, _pairs(config),
                                 hf_common.t5_copies(config))
