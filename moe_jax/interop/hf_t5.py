"""Hugging Face T5 v1.1 (dense) weights <-> moe_jax parameters.

  config = config_from_hf(hf_model.config)
  params = import_t5(hf_model.state_dict(), config)   # or a safetensors dict
  state_dict = export_t5(params, config)              # numpy arrays

Mapping (torch `Linear.weight` is [out, in]; moe_jax kernels are [in, ...]):
HF attention does not scale scores by 1/sqrt(Dh) and moe_jax does, so the
query kernel is multiplied by sqrt(Dh) on import (divided on export): the
same function. HF keeps one relative-bias table per stack in its first
layer; moe_jax keeps it at the stack level. Only untied output embeddings
(T5 v1.1, `tie_word_embeddings=False`) and the gated-gelu FFN are mapped.
Sparse (SwitchTransformers) checkpoints are not handled here.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

from flax import traverse_util
import numpy as np

from moe_jax.models.config import TransformerConfig

_ATTENTION = {"self_attention": "SelfAttention",
              "encoder_decoder_attention": "EncDecAttention"}


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
  return TransformerConfig(
      vocab_size=hf_config.vocab_size, emb_dim=hf_config.d_model,
      num_heads=hf_config.num_heads, head_dim=hf_config.d_kv,
      mlp_dim=hf_config.d_ff, num_encoder_layers=hf_config.num_layers,
      num_decoder_layers=hf_config.num_decoder_layers,
      relative_attention_num_buckets=(
          hf_config.relative_attention_num_buckets),
      relative_attention_max_distance=(
          hf_config.relative_attention_max_distance))


def _pairs(config: TransformerConfig) -> Iterator[tuple[tuple[str, ...], str,
                                                        str]]:
  """(moe_jax path, HF key, kind) for every parameter; kind says how the
  array is reshaped (see `_to_moe_jax`)."""
  if config.encoder_moe or config.decoder_moe:
    raise ValueError("encoder_moe / decoder_moe must be None: only dense T5 "
                     "is mapped")
  yield ("embedder", "token_embedder", "embedding"), "shared.weight", "copy"
  yield ("embedder", "logits_dense", "kernel"), "lm_head.weight", "t"
  for stack, layers in (("encoder", config.num_encoder_layers),
                        ("decoder", config.num_decoder_layers)):
    yield ((stack, "relpos_bias", "rel_embedding"),
           f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
           ".weight", "t")
    yield (stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight", "copy"
    sublayers = ["self_attention"] + (
        ["encoder_decoder_attention"] if stack == "decoder" else []) + ["mlp"]
    norms = {"self_attention": "pre_self_attention_norm",
             "encoder_decoder_attention": "pre_cross_attention_norm",
             "mlp": "pre_mlp_norm"}
    for i in range(layers):
      ours = (stack, f"block_{i}", "layer_0")
      for j, sub in enumerate(sublayers):
        hf = f"{stack}.block.{i}.layer.{j}"
        yield ours + (norms[sub], "scale"), f"{hf}.layer_norm.weight", "copy"
        if sub == "mlp":
          for w in ("wi_0", "wi_1", "wo"):
            yield ours + ("mlp", w), f"{hf}.DenseReluDense.{w}.weight", "t"
          continue
        for ours_name, hf_name, kind in (("query", "q", "q"), ("key", "k", "in"),
                                         ("value", "v", "in"),
                                         ("out", "o", "out")):
          yield (ours + (sub, ours_name, "kernel"),
                 f"{hf}.{_ATTENTION[sub]}.{hf_name}.weight", kind)


def _to_moe_jax(w: np.ndarray, kind: str, config: TransformerConfig
                ) -> np.ndarray:
  heads, depth = config.num_heads, config.head_dim
  if kind == "copy":
    return w
  if kind == "t":
    return w.T
  if kind in ("q", "in"):   # [H*Dh, D] -> [D, H, Dh]
    w = w.T.reshape(-1, heads, depth)
    return w * math.sqrt(depth) if kind == "q" else w
  return w.T.reshape(heads, depth, -1)   # out: [D, H*Dh] -> [H, Dh, D]


def _to_hf(w: np.ndarray, kind: str, config: TransformerConfig) -> np.ndarray:
  if kind == "copy":
    return w
  if kind == "t":
    return w.T
  if kind in ("q", "in"):   # [D, H, Dh] -> [H*Dh, D]
    w = w / math.sqrt(config.head_dim) if kind == "q" else w
    return w.reshape(w.shape[0], -1).T
  return w.reshape(-1, w.shape[-1]).T    # out: [H, Dh, D] -> [D, H*Dh]


def _numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):   # torch tensor
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, np.float32)


def import_t5(state_dict: Mapping[str, Any],
              config: TransformerConfig) -> dict[str, Any]:
  """moe_jax `params` (nested dict of float32 arrays) from a HF T5 state dict
  (torch tensors or numpy arrays, e.g. `safetensors.numpy.load_file`)."""
  shared = _numpy(state_dict["shared.weight"])
  for stack in ("encoder", "decoder"):
    key = f"{stack}.embed_tokens.weight"
    if key in state_dict and not np.array_equal(_numpy(state_dict[key]),
                                                shared):
      raise ValueError(f"{key} differs from shared.weight; moe_jax shares "
                       "one input embedding between the stacks")
  flat = {}
  for path, key, kind in _pairs(config):
    if key not in state_dict:
      raise KeyError(f"{key} missing from the state dict")
    flat[path] = _to_moe_jax(_numpy(state_dict[key]), kind, config)
  return traverse_util.unflatten_dict(flat)


def export_t5(params: Mapping[str, Any],
              config: TransformerConfig) -> dict[str, np.ndarray]:
  """HF T5 state dict (numpy float32) from moe_jax `params`."""
  flat = traverse_util.flatten_dict(dict(params))
  out = {key: _to_hf(np.asarray(flat[path], np.float32), kind, config)
         for path, key, kind in _pairs(config)}
  for stack in ("encoder", "decoder"):   # HF keeps views of `shared`
    out[f"{stack}.embed_tokens.weight"] = out["shared.weight"]
  return out
