"""What Hugging Face importers share: the array conversions, the checks
and the safetensors files; and the T5-family layout (embeddings,
attention, norms and relative position bias).

Model-specific modules (`hf_t5`, `hf_switch`, `hf_mixtral`) list their
parameters as pairs (T5 family: `pairs` plus an `FfnPairs` callback for the
feed-forward layers) and call `import_params` / `export_params`.

A pair is (moe_jax path, HF key(s), kind). Torch `Linear.weight` is
[out, in]; moe_jax kernels are [in, ...]. A tuple of HF keys (one per
expert) maps to one moe_jax array with a leading expert axis E. Kinds:
copy; t (transpose); in ([K*Dh, D] -> [D, K, Dh], query / key / value);
q (T5 query: `in`, times sqrt(Dh), since HF T5 does not scale scores by
1/sqrt(Dh) and moe_jax does; divided on export); out ([D, H*Dh] ->
[H, Dh, D]); experts_t ([E, a, b] -> [E, b, a]); gate / up (the first /
second half of a fused [E, 2F, D] gated projection -> [E, D, F]). HF T5
keeps one relative-bias table per stack in its first layer; moe_jax keeps
it at the stack level.

Before converting anything, `import_params` checks the state dict against
the model the config builds (`moe_jax.interop.checks`): every weight
present, none left over, every shape right, no NaN / inf (unless
allow_non_finite=True).
"""

from __future__ import annotations

import json
import math
import os
from typing import (Any, Callable, Iterable, Iterator, Mapping, Optional,
                    Union)

import flax.linen as nn
from flax import traverse_util
import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from moe_jax.interop import checks
from moe_jax.models import build_model, dummy_batch
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


def check_model_type(hf_config: Any, expected: str, importer: str) -> None:
  """`hf_config.model_type` is what `importer` reads."""
  got = getattr(hf_config, "model_type", None)
  if got != expected:
    raise ValueError(f"model_type must be {expected!r} for {importer}; got "
                     f"model_type={got!r}")


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


def t5_copies(config: TransformerConfig) -> dict[str, str]:
  """{HF key: key it copies}: the views of `shared.weight` in a T5-family
  state dict (the LM head too when moe_jax ties it)."""
  keys = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"] + (
      ["lm_head.weight"] if config.logits_via_embedding else [])
  return dict.fromkeys(keys, "shared.weight")


def _to_moe_jax(w: np.ndarray, kind: str, shape: tuple[int, ...]
                ) -> np.ndarray:
  """HF array `w` as the moe_jax array of `shape` (see the kinds above)."""
  if kind == "copy":
    return w
  if kind in ("t", "in", "q", "out"):
    w = w.T.reshape(shape)
    return w * math.sqrt(shape[-1]) if kind == "q" else w
  if kind == "experts_t":
    return w.swapaxes(1, 2)
  half = w.shape[1] // 2   # gate / up
  return (w[:, :half] if kind == "gate" else w[:, half:]).swapaxes(1, 2)


def _to_hf(w: np.ndarray, kind: str) -> np.ndarray:
  """The inverse of `_to_moe_jax`; gate / up give their half."""
  if kind == "copy":
    return w
  if kind == "t":
    return w.T
  if kind in ("q", "in"):   # [D, K, Dh] -> [K*Dh, D]
    w = w / math.sqrt(w.shape[-1]) if kind == "q" else w
    return w.reshape(w.shape[0], -1).T
  if kind == "out":   # [H, Dh, D] -> [D, H*Dh]
    return w.reshape(-1, w.shape[-1]).T
  return w.swapaxes(1, 2)   # experts_t, gate, up


def _hf_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  """Shape of the HF array of a moe_jax array of `shape`."""
  if kind == "copy":
    return shape
  if kind == "t":
    return shape[::-1]
  if kind in ("q", "in"):
    return (math.prod(shape[1:]), shape[0])
  if kind == "out":
    return (shape[-1], math.prod(shape[:-1]))
  if kind == "experts_t":
    return (shape[0], shape[2], shape[1])
  return (shape[0], 2 * shape[2], shape[1])   # gate, up


def _numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):   # torch tensor
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, np.float32)


def param_shapes(config: TransformerConfig) -> dict[Path, tuple[int, ...]]:
  """{moe_jax path: shape} of the params `config` builds (no arrays)."""
  model = build_model(config)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), **dummy_batch(config, 1, 1, 1),
      enable_dropout=False))["params"]
  return {path: tuple(x.shape) for path, x in
          traverse_util.flatten_dict(nn.unbox(shapes)).items()}


def _hf_keys(keys: Keys) -> tuple[str, ...]:
  return (keys,) if isinstance(keys, str) else keys


def import_params(state_dict: Mapping[str, Any], all_pairs: Iterable[Pair],
                  config: TransformerConfig, *,
                  copies: Optional[Mapping[str, str]] = None,
                  allow_non_finite: bool = False) -> dict[str, Any]:
  """moe_jax `params` (nested dict of float32 arrays) from a HF state dict.

  Args:
    state_dict: {HF key: torch tensor or numpy array}, e.g. a model's
      `state_dict()` or `load_safetensors(path)`.
    all_pairs: the model's pairs; together they must cover exactly the
      params `config` builds.
    copies: {HF key: key it copies}: keys the state dict may hold as
      copies of another (checked equal) or leave out.
    allow_non_finite: import NaN / inf weights instead of raising.

  Raises:
    KeyError / ValueError from `moe_jax.interop.checks`, naming the key.
  """
  copies = dict(copies or {})
  shapes = param_shapes(config)
  all_pairs = list(all_pairs)
  unpaired = set(shapes) - {path for path, _, _ in all_pairs}
  if unpaired:
    raise ValueError(f"no HF weight maps to {sorted(unpaired)[0]}: the "
                     "config has parts this importer does not map")

  expected = {}
  for path, keys, kind in all_pairs:
    shape = shapes[path] if isinstance(keys, str) else shapes[path][1:]
    for key in _hf_keys(keys):
      expected[key] = _hf_shape(shape, kind)
  checks.check_names(state_dict, expected, extra=copies)
  checks.check_shapes(state_dict, expected)
  for key, original in copies.items():
    if (key in state_dict and original in state_dict and
        not np.array_equal(_numpy(state_dict[key]),
                           _numpy(state_dict[original]))):
      raise ValueError(f"{key} differs from {original}; moe_jax ties them")

  def load(key: str, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    w = _numpy(state_dict[key])
    checks.check_finite(key, w, allow_non_finite=allow_non_finite)
    return _to_moe_jax(w, kind, shape)

  flat = {}
  for path, keys, kind in all_pairs:
    if isinstance(keys, str):
      flat[path] = load(keys, kind, shapes[path])
    else:
      flat[path] = np.stack([load(key, kind, shapes[path][1:])
                             for key in keys])
  return traverse_util.unflatten_dict(flat)


def export_params(params: Mapping[str, Any], all_pairs: Iterable[Pair],
                  copies: Optional[Mapping[str, str]] = None
                  ) -> dict[str, np.ndarray]:
  """HF state dict (numpy float32) from moe_jax `params`; `copies`:
  {HF key: key it copies} that HF keeps as views of one array."""
  flat = traverse_util.flatten_dict(nn.unbox(dict(params)))
  out, halves = {}, {}
  for path, keys, kind in all_pairs:
    w = np.asarray(flat[path], np.float32)
    if kind in ("gate", "up"):
      halves.setdefault(keys, {})[kind] = _to_hf(w, kind)
    elif isinstance(keys, str):
      out[keys] = _to_hf(w, kind)
    else:
      out.update((key, _to_hf(w_e, kind)) for key, w_e in zip(keys, w))
  for key, parts in halves.items():
    out[key] = np.concatenate([parts["gate"], parts["up"]], axis=1)
  for key, original in (copies or {}).items():
    out[key] = out[original]
  return out


class SafetensorsArray:
  """One array of a `.safetensors` file: its `shape` from the header, its
  values read only when converted (`np.asarray`)."""

  def __init__(self, path: str, key: str, shape: tuple[int, ...]):
    self.path, self.key, self.shape = path, key, tuple(shape)

  def __array__(self, dtype=None, copy=None):
    del copy   # every read is a fresh array
    with safe_open(self.path, framework="np") as f:
      w = f.get_tensor(self.key)
    return w if dtype is None else w.astype(dtype)


def _file_arrays(path: str) -> dict[str, SafetensorsArray]:
  with safe_open(path, framework="np") as f:
    return {key: SafetensorsArray(path, key, f.get_slice(key).get_shape())
            for key in f.keys()}


def load_safetensors(path: Union[str, os.PathLike]
                     ) -> dict[str, SafetensorsArray]:
  """{HF key: array} of a `.safetensors` file or a model directory (its
  `model.safetensors`, or every shard of its index); no pickle. Arrays are
  read one at a time as the importer converts them, so an import holds
  the converted copy and one checkpoint array."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    return _file_arrays(path)
  index = os.path.join(path, "model.safetensors.index.json")
  if not os.path.exists(index):
    return _file_arrays(os.path.join(path, "model.safetensors"))
  with open(index, encoding="utf-8") as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  out = {}
  for shard in shards:
    out.update(_file_arrays(os.path.join(path, shard)))
  return out


def save_safetensors(state_dict: Mapping[str, np.ndarray],
                     path: Union[str, os.PathLike]) -> None:
  """Writes an exported state dict as one `.safetensors` file (each copy of
  a shared array written separately), marked as torch's ("format": "pt")
  as transformers' `from_pretrained` expects."""
  save_file({key: np.ascontiguousarray(value) for key, value in
             state_dict.items()}, os.fspath(path), metadata={"format": "pt"})
