"""What Hugging Face T5-family checkpoints share: the layout of embeddings,
attention, norms and relative position bias, and the array conversions.

Model-specific modules (`hf_t5`, `hf_switch`) add their feed-forward
parameters through an `FfnPairs` callback and call `import_params` /
`export_params`.

A pair is (moe_jax path, HF key(s), kind). Torch `Linear.weight` is
[out, in]; moe_jax kernels are [in, ...]. A tuple of HF keys (one per
expert) maps to one moe_jax array with a leading expert axis E.
HF attention does not scale scores by 1/sqrt(Dh) and moe_jax does, so the
query kernel is multiplied by sqrt(Dh) on import (divided on export): the
same function. HF keeps one relative-bias table per stack in its first
layer; moe_jax keeps it at the stack level.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Mapping, Union

from flax import traverse_util
import numpy as np

from moe_jax.models.config import TransformerConfig

Path = tuple[str, ...]
Keys = Union[str, tuple[str, ...]]
Pair = tuple[Path, Keys, str]
# (stack, layer index i, moe_jax path of layer i, HF prefix of its FFN
# sublayer, e.g. "encoder.block.3.layer.1") -> the FFN's pairs.
FfnPairs = Callable[[str, int, Path, str], Iterator[Pair]]

_ATTENTION = {"self_attention": "SelfAttention",
              "encoder_decoder_attention": "EncDecAttention"}
_NORMS = {"self_attention": "pre_self_attention_norm",
          "encoder_decoder_attention": "pre_cross_attention_norm",
          "mlp": "pre_mlp_norm"}


def check_layer_norm_epsilon(hf_config: Any) -> None:
  """moe_jax's RMSNorm uses epsilon 1e-6 (T5)."""
  epsilon = getattr(hf_config, "layer_norm_epsilon", 1e-6)
  if epsilon != 1e-6:
    raise ValueError(f"layer_norm_epsilon must be 1e-6; got {epsilon}")


def layer_path(config: TransformerConfig, stack: str, i: int) -> Path:
  """moe_jax path of layer i of `stack` (unscanned blocks)."""
  size = config.block_size(stack)
  return (stack, f"block_{i // size}", f"layer_{i % size}")


def is_sparse(config: TransformerConfig, stack: str, i: int) -> bool:
  """Layer i of `stack` has the MoE FFN (the last layer of each block)."""
  size = config.block_size(stack)
  return config.moe(stack) is not None and i % size == size - 1


def pairs(config: TransformerConfig, ffn: FfnPairs) -> Iterator[Pair]:
  """Every parameter: embeddings, output projection (unless tied), position
  bias, norms and attention, plus the FFN pairs from `ffn`."""
  if config.scan_layers:
    raise ValueError("scan_layers must be False: the mapping names unscanned "
                     "blocks (block_0, block_1, ...)")
  yield ("embedder", "token_embedder", "embedding"), "shared.weight", "copy"
  if not config.logits_via_embedding:
    yield ("embedder", "logits_dense", "kernel"), "lm_head.weight", "t"
  for stack in ("encoder", "decoder"):
    yield ((stack, "relpos_bias", "rel_embedding"),
           f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
           ".weight", "t")
    yield ((stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight",
           "copy")
    sublayers = ["self_attention"] + (
        ["encoder_decoder_attention"] if stack == "decoder" else []) + ["mlp"]
    for i in range(config.num_layers(stack)):
      ours = layer_path(config, stack, i)
      for j, sub in enumerate(sublayers):
        hf = f"{stack}.block.{i}.layer.{j}"
        yield ours + (_NORMS[sub], "scale"), f"{hf}.layer_norm.weight", "copy"
        if sub == "mlp":
          yield from ffn(stack, i, ours, hf)
          continue
        for ours_name, hf_name, kind in (("query", "q", "q"),
                                         ("key", "k", "in"),
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


def _tied_keys(config: TransformerConfig) -> list[str]:
  """HF keys that hold copies (views) of `shared.weight`."""
  return (["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"] +
          (["lm_head.weight"] if config.logits_via_embedding else []))


def import_params(state_dict: Mapping[str, Any], all_pairs: Iterator[Pair],
                  config: TransformerConfig) -> dict[str, Any]:
  """moe_jax `params` (nested dict of float32 arrays) from a HF state dict
  (torch tensors or numpy arrays, e.g. `safetensors.numpy.load_file`)."""
  shared = _numpy(state_dict["shared.weight"])
  for key in _tied_keys(config):
    if key in state_dict and not np.array_equal(_numpy(state_dict[key]),
                                                shared):
      raise ValueError(f"{key} differs from shared.weight; moe_jax ties it "
                       "to the one input embedding")

  def load(key: str, kind: str) -> np.ndarray:
    if key not in state_dict:
      raise KeyError(f"{key} missing from the state dict")
    return _to_moe_jax(_numpy(state_dict[key]), kind, config)

  flat = {}
  for path, keys, kind in all_pairs:
    flat[path] = (load(keys, kind) if isinstance(keys, str) else
                  np.stack([load(key, kind) for key in keys]))
  return traverse_util.unflatten_dict(flat)


def export_params(params: Mapping[str, Any], all_pairs: Iterator[Pair],
                  config: TransformerConfig) -> dict[str, np.ndarray]:
  """HF state dict (numpy float32) from moe_jax `params`."""
  flat = traverse_util.flatten_dict(dict(params))
  out = {}
  for path, keys, kind in all_pairs:
    w = np.asarray(flat[path], np.float32)
    if isinstance(keys, str):
      out[keys] = _to_hf(w, kind, config)
    else:
      out.update((key, _to_hf(w_e, kind, config))
                 for key, w_e in zip(keys, w))
  for key in _tied_keys(config):   # HF keeps views of `shared`
    out[key] = out["shared.weight"]
  return out
