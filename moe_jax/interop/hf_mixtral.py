"""Hugging Face Mixtral (decoder-only, top-2 SwiGLU experts) <-> moe_jax.

  config = config_from_hf(hf_model.config)      # dropless
  params = import_mixtral(hf_common.load_safetensors(model_dir), config)
  state_dict = export_mixtral(params, config, fused_experts=True)

Mixtral maps onto the decoder-only model with rotary embeddings (HF's
rotate-half convention, the same frequencies), grouped-query attention
(`num_kv_heads`), RMSNorm epsilon `rms_norm_eps`, every layer sparse, and
a separate, unscaled LM head. Routing is renormalized top-K token choice
(softmax in float32, gates divided by their sum). HF Mixtral drops no
token: the default config is dropless; `capacity_factor` gives moe_jax's
capacity-bounded SCATTER path instead (equal to HF when nothing drops).

Expert layouts: transformers >= 5 fuses each layer's experts into
`mlp.experts.gate_up_proj` <[E, 2F, D]> (gate half first) and
`mlp.experts.down_proj` <[E, D, F]>, router `mlp.gate.weight`; older
versions keep one `block_sparse_moe.experts.{e}.w1/w3/w2` Linear per
expert (w1 gate, w3 up, w2 down), router `block_sparse_moe.gate.weight`.
Import reads whichever the state dict holds; export writes the one asked.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import numpy as np

from moe_jax.interop import hf_common
from moe_jax.models.config import (Architecture, MoeConfig,
                                   PositionEmbedding, TransformerConfig)
from moe_jax.moe.dispatch import Dispatch
from moe_jax.moe.experts import Activation
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter

_FUSED_PROBE = "model.layers.0.mlp.experts.gate_up_proj"


def _rope_theta(hf_config: Any) -> float:
  """The rotary base: `rope_parameters` (transformers 5) or `rope_theta`."""
  rope = getattr(hf_config, "rope_parameters", None) or {
      "rope_type": "default", "rope_theta": hf_config.rope_theta}
  rope_type = rope.get("rope_type", "default")
  if rope_type != "default":
    raise ValueError(f"rope_parameters.rope_type must be 'default'; got "
                     f"{rope_type!r}")
  return float(rope["rope_theta"])


def config_from_hf(hf_config: Any, *, capacity_factor: Optional[float] = None
                   ) -> TransformerConfig:
  """A moe_jax decoder-only `TransformerConfig` equal to a `MixtralConfig`.

  Args:
    hf_config: the HF config.
    capacity_factor: None: dropless (as HF). Otherwise the SCATTER path
      with this train and eval capacity factor (`MoeLayer`'s); HF's
      logits whenever no token is dropped.
  """
  hf_common.check_model_type(hf_config, "mixtral",
                             "moe_jax.interop.hf_mixtral")
  if hf_config.hidden_act != "silu":
    raise ValueError(f"hidden_act must be 'silu'; got "
                     f"{hf_config.hidden_act!r}")
  if hf_config.tie_word_embeddings:
    raise ValueError("tie_word_embeddings must be False: moe_jax's tied head "
                     "scales by d_model^-0.5 and Mixtral's does not")
  if getattr(hf_config, "sliding_window", None) is not None:
    raise ValueError("sliding_window must be None: moe_jax attends to every "
                     f"earlier token; got {hf_config.sliding_window}")
  heads = hf_config.num_attention_heads
  head_dim = (getattr(hf_config, "head_dim", None) or
              hf_config.hidden_size // heads)
  grouping = (dict(dispatch=Dispatch.DROPLESS) if capacity_factor is None
              else dict(dispatch=Dispatch.SCATTER, min_expert_capacity=1,
                        train_capacity_factor=capacity_factor,
                        eval_capacity_factor=capacity_factor))
  moe = MoeConfig(layer=MoeLayer(
      router=TokenChoiceRouter(
          num_selected_experts=hf_config.num_experts_per_tok,
          renormalize_gates=True,
          jitter_noise=getattr(hf_config, "router_jitter_noise", 0.0)),
      num_experts=hf_config.num_local_experts, **grouping), sparse_every=1)
  return TransformerConfig(
      vocab_size=hf_config.vocab_size, emb_dim=hf_config.hidden_size,
      num_heads=heads, head_dim=head_dim,
      num_kv_heads=hf_config.num_key_value_heads,
      mlp_dim=hf_config.intermediate_size,
      num_decoder_layers=hf_config.num_hidden_layers,
      architecture=Architecture.DECODER_ONLY, activation=Activation.SWIGLU,
      norm_epsilon=hf_config.rms_norm_eps,
      position_embedding=PositionEmbedding.ROPE,
      rope_max_wavelength=_rope_theta(hf_config), decoder_moe=moe)


def _pairs(config: TransformerConfig, fused_experts: bool
           ) -> Iterator[hf_common.Pair]:
  if (Architecture(config.architecture) != Architecture.DECODER_ONLY or
      config.logits_via_embedding or config.decoder_moe is None or
      config.decoder_moe.sparse_every != 1 or
      config.decoder_moe.extra_dense_ffn):
    raise ValueError("config must be decoder_only, untied "
                     "(logits_via_embedding=False), with every layer sparse "
                     "(decoder_moe.sparse_every=1, no extra_dense_ffn)")
  layer = config.moe_layer("decoder")
  if Activation(layer.activation) != Activation.SWIGLU:
    raise ValueError(f"decoder_moe.layer.activation must be swiglu; got "
                     f"{layer.activation}")
  yield ("embedder", "token_embedder", "embedding"), (
      "model.embed_tokens.weight"), "copy"
  yield ("embedder", "logits_dense", "kernel"), "lm_head.weight", "t"
  yield ("decoder", "final_norm", "scale"), "model.norm.weight", "copy"
  for i in range(config.num_decoder_layers):
    ours, hf = hf_common.layer_path(config, "decoder", i), f"model.layers.{i}"
    yield (ours + ("pre_self_attention_norm", "scale"),
           f"{hf}.input_layernorm.weight", "copy")
    yield (ours + ("pre_mlp_norm", "scale"),
           f"{hf}.post_attention_layernorm.weight", "copy")
    for name, kind in (("query", "in"), ("key", "in"), ("value", "in"),
                       ("out", "out")):
      yield (ours + ("self_attention", name, "kernel"),
             f"{hf}.self_attn.{name[0]}_proj.weight", kind)
    moe = ours + ("moe",)
    if fused_experts:
      yield (moe + ("router", "router_weights", "kernel"),
             f"{hf}.mlp.gate.weight", "t")
      yield moe + ("experts", "wi_0"), f"{hf}.mlp.experts.gate_up_proj", "gate"
      yield moe + ("experts", "wi_1"), f"{hf}.mlp.experts.gate_up_proj", "up"
      yield (moe + ("experts", "wo"), f"{hf}.mlp.experts.down_proj",
             "experts_t")
      continue
    yield (moe + ("router", "router_weights", "kernel"),
           f"{hf}.block_sparse_moe.gate.weight", "t")
    for ours_name, hf_name in (("wi_0", "w1"), ("wi_1", "w3"), ("wo", "w2")):
      yield moe + ("experts", ours_name), tuple(
          f"{hf}.block_sparse_moe.experts.{e}.{hf_name}.weight"
          for e in range(layer.num_experts)), "t"


def import_mixtral(state_dict: Mapping[str, Any], config: TransformerConfig,
                   *, allow_non_finite: bool = False) -> dict[str, Any]:
  """moe_jax `params` from a HF Mixtral state dict (torch tensors or numpy
  arrays), in either expert layout. Expert weights stack to <[E, D, F]> /
  <[E, F, D]>.

  Raises KeyError / ValueError naming the key for missing, left-over,
  mis-shaped or (unless `allow_non_finite`) non-finite weights.
  """
  return hf_common.import_params(
      state_dict, _pairs(config, _FUSED_PROBE in state_dict), config,
      allow_non_finite=allow_non_finite)


def export_mixtral(params: Mapping[str, Any], config: TransformerConfig, *,
                   fused_experts: bool) -> dict[str, np.ndarray]:
  """HF Mixtral state dict (numpy float32) from moe_jax `params`;
  `fused_experts`: transformers >= 5's layout (see the module docstring)."""
  return hf_common.export_params(params, _pairs(config, fused_experts))
