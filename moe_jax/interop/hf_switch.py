"""Hugging Face SwitchTransformers (sparse T5, top-1) <-> moe_jax parameters.

  config = config_from_hf(hf_model.config, encoder_length=512,
                          decoder_length=114)
  params = import_switch(hf_common.load_safetensors(model_dir), config)
  hf_common.save_safetensors(export_switch(params, config), "out.safetensors")

Embeddings, attention and norms map as in `moe_jax.interop.hf_common`. HF
layer i of a stack is sparse when i % sparse_step == 1 (or sparse_step == 1);
moe_jax makes the last layer of every block of `sparse_every` layers sparse,
so steps 1 and 2 map (every released checkpoint uses 2). Tied embeddings
map to `logits_via_embedding` (both scale the decoder output by D^-0.5).

Routing is Switch's top-1 token choice: softmax over experts in float32,
the gate is the top probability, tokens claim expert slots in sequence
order. HF's capacity is `expert_capacity` tokens per expert per sequence.
Given a stack's sequence length, moe_jax routes each sequence as one group
with exactly that capacity, so the same tokens are dropped; the config
records the length (`MoeConfig.sequence_length`) and the model refuses a
batch of another length, whose groups would straddle sequences and whose
drops would silently differ from HF's. Without it, the stack is dropless:
equal to HF whenever HF drops no token. moe_jax never routes padding; HF
does (it stores `router_ignore_padding_tokens` but does not read it), so
the two differ only where padding precedes real tokens in a sequence and
takes a slot a real token needed.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import numpy as np

from moe_jax.moe.dispatch import Dispatch
from moe_jax.moe.experts import Activation
from moe_jax.interop import hf_common
from moe_jax.models.config import MoeConfig, TransformerConfig
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter

_ACTIVATIONS = {"relu": Activation.RELU}


def _sparse_every(hf_config: Any, stack: str, layers: int) -> Optional[int]:
  """moe_jax `sparse_every` putting MoE layers where HF does; None: dense."""
  step = getattr(hf_config, f"{stack}_sparse_step")
  hf_sparse = [i for i in range(layers)
               if step > 0 and (i % step == 1 or step == 1)]
  if not hf_sparse:
    return None
  for every in range(1, layers + 1):
    if layers % every == 0 and hf_sparse == [
        i for i in range(layers) if i % every == every - 1]:
      return every
  raise ValueError(
      f"{stack}_sparse_step={step} makes HF layers {hf_sparse} of {layers} "
      "sparse; moe_jax makes the last layer of every block of sparse_every "
      "layers sparse, which matches only steps 1 and 2")


def _moe(hf_config: Any, every: Optional[int],
         length: Optional[int]) -> Optional[MoeConfig]:
  """One stack's sparse layers; `length` tokens per sequence, or None."""
  if every is None:
    return None
  experts, capacity = hf_config.num_experts, hf_config.expert_capacity
  if length is None:
    grouping = dict(dispatch=Dispatch.DROPLESS)
  else:   # one group per sequence, C = min(expert_capacity, length)
    factor = capacity * experts / length
    grouping = dict(dispatch=Dispatch.SCATTER, max_group_size=length,
                    min_expert_capacity=capacity,
                    train_capacity_factor=factor, eval_capacity_factor=factor)
  return MoeConfig(layer=MoeLayer(
      router=TokenChoiceRouter(
          num_selected_experts=1, jitter_noise=hf_config.router_jitter_noise),
      num_experts=experts, **grouping), sparse_every=every,
      sequence_length=length)


def config_from_hf(hf_config: Any, *, encoder_length: Optional[int] = None,
                   decoder_length: Optional[int] = None) -> TransformerConfig:
  """A moe_jax `TransformerConfig` equal to a HF `SwitchTransformersConfig`.

  Args:
    hf_config: the HF config.
    encoder_length, decoder_length: tokens per sequence of the batches the
      stack will see: capacity is then HF's, per sequence (drops included);
      None: that stack is dropless (see the module docstring).
  """
  hf_common.check_model_type(hf_config, "switch_transformers",
                             "moe_jax.interop.hf_switch")
  act = hf_config.dense_act_fn
  if act not in _ACTIVATIONS:
    raise ValueError(f"dense_act_fn must be one of {sorted(_ACTIVATIONS)}; "
                     f"got {act!r}")
  if hf_config.router_bias:
    raise ValueError("router_bias must be False: moe_jax routers have no "
                     "bias")
  if hf_config.router_dtype != "float32":
    raise ValueError("router_dtype must be 'float32' (moe_jax routes in "
                     f"float32); got {hf_config.router_dtype!r}")
  encoder_layers = hf_config.num_layers
  decoder_layers = hf_config.num_decoder_layers
  return TransformerConfig(
      vocab_size=hf_config.vocab_size, emb_dim=hf_config.d_model,
      num_heads=hf_config.num_heads, head_dim=hf_config.d_kv,
      mlp_dim=hf_config.d_ff, num_encoder_layers=encoder_layers,
      num_decoder_layers=decoder_layers, activation=_ACTIVATIONS[act],
      norm_epsilon=hf_config.layer_norm_epsilon,
      logits_via_embedding=bool(hf_config.tie_word_embeddings),
      relative_attention_num_buckets=(
          hf_config.relative_attention_num_buckets),
      relative_attention_max_distance=(
          hf_config.relative_attention_max_distance),
      encoder_moe=_moe(
          hf_config, _sparse_every(hf_config, "encoder", encoder_layers),
          encoder_length),
      decoder_moe=_moe(
          hf_config, _sparse_every(hf_config, "decoder", decoder_layers),
          decoder_length))


def _pairs(config: TransformerConfig) -> Iterator[hf_common.Pair]:
  if Activation(config.activation) not in _ACTIVATIONS.values():
    raise ValueError(f"activation must be relu (non-gated); got "
                     f"{config.activation}")
  for stack in ("encoder", "decoder"):
    moe, layer = config.moe(stack), config.moe_layer(stack)
    if moe is None:
      continue
    if (moe.extra_dense_ffn or layer.num_shared_experts or
        layer.expert_hidden_dim != config.mlp_dim):
      raise ValueError(f"{stack}_moe: extra_dense_ffn, num_shared_experts "
                       "and expert_hidden_dim have no SwitchTransformers "
                       "counterpart")
    if layer.activation != config.activation:
      raise ValueError(f"{stack}_moe.layer.activation must equal activation")
    if not isinstance(layer.router, TokenChoiceRouter):
      raise ValueError(f"{stack}_moe.layer.router must be a TokenChoiceRouter; "
                       f"got {type(layer.router).__name__}")

  def ffn(stack, i, ours, hf):
    if not hf_common.is_sparse(config, stack, i):
      for w in ("wi", "wo"):
        yield ours + ("mlp", w), f"{hf}.mlp.{w}.weight", "t"
      return
    yield (ours + ("moe", "router", "router_weights", "kernel"),
           f"{hf}.mlp.router.classifier.weight", "t")
    for w in ("wi", "wo"):
      yield ours + ("moe", "experts", w), tuple(
          f"{hf}.mlp.experts.expert_{e}.{w}.weight"
          for e in range(config.moe(stack).layer.num_experts)), "t"

  return hf_common.pairs(config, ffn)


def import_switch(state_dict: Mapping[str, Any], config: TransformerConfig, *,
                  allow_non_finite: bool = False) -> dict[str, Any]:
  """moe_jax `params` from a HF SwitchTransformers state dict (torch tensors
  or numpy arrays). Expert weights stack to <[E, D, F]> / <[E, F, D]>.

  Raises KeyError / ValueError naming the key for missing, left-over,
  mis-shaped or (unless `allow_non_finite`) non-finite weights.
  """
  return hf_common.import_params(state_dict, _pairs(config), config,
                                 copies=hf_common.t5_copies(config),
                                 allow_non_finite=allow_non_finite)


def export_switch(params: Mapping[str, Any],
                  config: TransformerConfig) -> dict[str, np.ndarray]:
  """HF SwitchTransformers state dict (numpy float32) from moe_jax
  `params`."""
  return hf_common.export_params(params, _pairs(config),
                                 hf_common.t5_copies(config))
