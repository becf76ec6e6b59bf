"""flaxformer's parameter names and layouts <-> moe_jax parameters.

T5X checkpoints of T5 v1.1, FLAN-T5, Switch and ST-MoE hold flaxformer's
parameter tree (`t5_architecture.EncoderDecoder`, with
`moe_architecture.SparseEncoder` / `SparseDecoder` for sparse models), e.g.

  token_embedder/embedding                      [V, D]
  encoder/relpos_bias/rel_embedding             [H, buckets]   (shared)
  encoder/layers_0/pre_attention_layer_norm/scale
  encoder/layers_0/attention/query/kernel       [D, H*Dh]
  encoder/layers_0/attention/out/kernel         [H*Dh, D]
  encoder/layers_0/mlp/wi_0/kernel              [D, F]  (wi when not gated)
  encoder/layers_1/mlp/router/router_weights/w/kernel     [D, E]
  encoder/layers_1/mlp/expert/wi_0/kernel       [E, D, F]
  encoder/layers_1/pre_extra_mlp_layer_norm/scale         (ST-MoE)
  encoder/layers_1/extra_mlp/wi_0/kernel                  (ST-MoE)
  encoder/encoder_norm/scale
  decoder/layers_0/{self_attention,encoder_decoder_attention}/...
  decoder/logits_dense/kernel                   [D, V]  (untied only)

Sparse layers sit in flaxformer's MIXED layout: with num_sparse_layers = N
of L layers, layer i is sparse when i % (L / N) == L / N - 1, which is
moe_jax's last layer of every block of `sparse_every` = L / N layers.
flaxformer stores attention kernels flattened to 2-D ([D, H*Dh]) and does
not scale attention scores (`rescale_logits=False`, T5's 1/sqrt(Dh) folded
into the query initialization); moe_jax scales them, so the query kernel
is multiplied by sqrt(Dh) on import and divided on export. Tied logits
(Switch: no `logits_dense`) scale the decoder output by D^-0.5 in both.

A pair is (moe_jax path, flaxformer name, kind); `layout(config)` pairs
every parameter of the model `config` builds, or raises for a config with
no flaxformer counterpart.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, Mapping

from flax import traverse_util
import jax
import numpy as np

from moe_jax.models import build_model
from moe_jax.models.config import PositionEmbedding, TransformerConfig
from moe_jax.moe.experts import Activation

Path = tuple[str, ...]
Pair = tuple[Path, str, str]
Shape = tuple[int, ...]

# moe_jax sublayer -> (flaxformer module name per stack, its norm's name).
_ATTENTION = {
    "self_attention": ({"encoder": "attention", "decoder": "self_attention"},
                       {"encoder": "pre_attention_layer_norm",
                        "decoder": "pre_self_attention_layer_norm"}),
    "encoder_decoder_attention": (
        {"decoder": "encoder_decoder_attention"},
        {"decoder": "pre_cross_attention_layer_norm"}),
}
_NORMS = {"self_attention": "pre_self_attention_norm",
          "encoder_decoder_attention": "pre_cross_attention_norm"}


def _check_config(config: TransformerConfig) -> None:
  if config.scan_layers:
    raise ValueError("scan_layers must be False: the mapping names unscanned "
                     "layers (flaxformer layers_0, layers_1, ...)")
  if PositionEmbedding(config.position_embedding) != (
      PositionEmbedding.RELATIVE):
    raise ValueError("position_embedding must be 'relative' (T5's relative "
                     f"bias); got {config.position_embedding}")
  if config.num_encoder_layers < 1:
    raise ValueError("the flaxformer mapping is for encoder-decoder (T5) "
                     "models; num_encoder_layers must be >= 1")


def _ffn(config: TransformerConfig, stack: str, i: int, ours: Path,
         theirs: str) -> Iterator[Pair]:
  moe = config.moe(stack)
  size = config.block_size(stack)
  dense_weights = Activation(config.activation).weight_names
  yield ours + ("pre_mlp_norm", "scale"), f"{theirs}/pre_mlp_layer_norm/scale", (
      "copy")
  if moe is None or i % size != size - 1:
    for w in dense_weights:
      yield ours + ("mlp", w), f"{theirs}/mlp/{w}/kernel", "copy"
    return
  layer = config.moe_layer(stack)
  yield (ours + ("moe", "router", "router_weights", "kernel"),
         f"{theirs}/mlp/router/router_weights/w/kernel", "copy")
  for w in Activation(layer.activation).weight_names:
    yield ours + ("moe", "experts", w), f"{theirs}/mlp/expert/{w}/kernel", (
        "copy")
  if moe.extra_dense_ffn:
    yield (ours + ("pre_extra_mlp_norm", "scale"),
           f"{theirs}/pre_extra_mlp_layer_norm/scale", "copy")
    for w in dense_weights:
      yield ours + ("extra_mlp", w), f"{theirs}/extra_mlp/{w}/kernel", "copy"


@dataclasses.dataclass(frozen=True)
class Layout:
  """Attributes:
    pairs: (moe_jax path, flaxformer name, kind) of every parameter.
    shapes: {moe_jax path: shape} of `config`'s model.
  """
  pairs: tuple[Pair, ...]
  shapes: dict[Path, Shape]

  def flaxformer_shapes(self) -> dict[str, Shape]:
    """{flaxformer name: shape} of every weight the model reads."""
    return {name: flaxformer_shape(self.shapes[path], kind)
            for path, name, kind in self.pairs}


def layout(config: TransformerConfig) -> Layout:
  """Every parameter of `config`'s model with its flaxformer name.

  Raises:
    ValueError: the config has no flaxformer counterpart (scanned layers,
      rotary embeddings, decoder-only, or a sparse layer whose parameters
      are not flaxformer's router + experts, e.g. a hash router).
  """
  _check_config(config)
  out = [(("embedder", "token_embedder", "embedding"),
          "token_embedder/embedding", "copy")]
  if not config.logits_via_embedding:
    out.append((("embedder", "logits_dense", "kernel"),
                "decoder/logits_dense/kernel", "copy"))
  for stack in ("encoder", "decoder"):
    out.append(((stack, "relpos_bias", "rel_embedding"),
                f"{stack}/relpos_bias/rel_embedding", "copy"))
    out.append(((stack, "final_norm", "scale"), f"{stack}/{stack}_norm/scale",
                "copy"))
    size = config.block_size(stack)
    for i in range(config.num_layers(stack)):
      ours = (stack, f"block_{i // size}", f"layer_{i % size}")
      theirs = f"{stack}/layers_{i}"
      for sub, (modules, norms) in _ATTENTION.items():
        if stack not in modules:
          continue
        out.append((ours + (_NORMS[sub], "scale"),
                    f"{theirs}/{norms[stack]}/scale", "copy"))
        for name in ("query", "key", "value", "out"):
          kind = {"query": "q", "out": "out"}.get(name, "in")
          out.append((ours + (sub, name, "kernel"),
                      f"{theirs}/{modules[stack]}/{name}/kernel", kind))
      out.extend(_ffn(config, stack, i, ours, theirs))
  shapes = param_shapes(config)
  missing = set(shapes) - {path for path, _, _ in out}
  if missing:
    names = sorted("/".join(path) for path in missing)
    raise ValueError(f"the config's model has parameters with no flaxformer "
                     f"counterpart (e.g. a router other than flaxformer's "
                     f"linear one): {', '.join(names[:5])}")
  return Layout(tuple(out), shapes)


def param_shapes(config: TransformerConfig) -> dict[Path, Shape]:
  """{moe_jax path: shape} of `config`'s model (abstract init, no arrays)."""
  tokens = np.ones((1, 1), np.int32)
  variables = jax.eval_shape(
      lambda: build_model(config).init(jax.random.PRNGKey(0), tokens, tokens,
                                       tokens, enable_dropout=False))
  flat = traverse_util.flatten_dict(dict(variables["params"]))
  return {path: tuple(getattr(leaf, "value", leaf).shape)
          for path, leaf in flat.items()}


def flaxformer_shape(shape: Shape, kind: str) -> Shape:
  """The flaxformer shape of a moe_jax parameter of `shape`."""
  if kind in ("q", "in"):   # [D, H, Dh] -> [D, H*Dh]
    return (shape[0], shape[1] * shape[2])
  if kind == "out":         # [H, Dh, D] -> [H*Dh, D]
    return (shape[0] * shape[1], shape[2])
  return tuple(shape)


def to_moe_jax(w: np.ndarray, kind: str, config: TransformerConfig
               ) -> np.ndarray:
  """A flaxformer array as moe_jax stores it (query rescaled, heads split)."""
  heads, depth = config.num_heads, config.head_dim
  if kind in ("q", "in"):   # [D, H*Dh] -> [D, H, Dh]
    w = w.reshape(w.shape[0], heads, depth)
    return w * np.float32(math.sqrt(depth)) if kind == "q" else w
  if kind == "out":         # [H*Dh, D] -> [H, Dh, D]
    return w.reshape(heads, depth, w.shape[-1])
  return w


def to_flaxformer(w: np.ndarray, kind: str) -> np.ndarray:
  """A moe_jax array in flaxformer's layout (the inverse of `to_moe_jax`)."""
  if kind == "q":
    w = w / np.float32(math.sqrt(w.shape[-1]))
  return w.reshape(flaxformer_shape(w.shape, kind))


def export_params(params: Mapping[str, Any], config: TransformerConfig
                  ) -> dict[str, np.ndarray]:
  """{flaxformer name: float32 array} from moe_jax `params` (e.g. to write
  a T5X checkpoint with T5X's own checkpointer)."""
  flat = traverse_util.flatten_dict(dict(params))
  return {name: to_flaxformer(np.asarray(flat[path], np.float32), kind)
          for path, name, kind in layout(config).pairs}
