"""Model configuration: frozen dataclasses, set from gin.

`TransformerConfig` describes a whole model; `MoeConfig` the sparse layers of
one stack (encoder or decoder), so the two stacks can route differently
(e.g. batch-prioritized routing or expert choice in the encoder only). The
MoE layer's knobs are the fields of `moe_jax.moe.layer.MoeLayer`, held here
as an unbound layer; `MoeConfig` adds only where the layers sit in a stack.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional

import jax.numpy as jnp

from moe_jax import knobs
from moe_jax.moe.experts import Activation
from moe_jax.moe.layer import MoeLayer


class Architecture(str, enum.Enum):
  ENCODER_DECODER = "encoder_decoder"
  DECODER_ONLY = "decoder_only"


class PositionEmbedding(str, enum.Enum):
  """RELATIVE: T5 bucketed relative attention bias, one table per stack.
  ROPE: rotary embeddings on queries and keys (Mixtral-style)."""
  RELATIVE = "relative"
  ROPE = "rope"


class RematPolicy(str, enum.Enum):
  """What a rematerialized layer block keeps for the backward pass."""
  NONE = "none"                    # no remat: keep every activation
  FULL = "full"                    # keep only block inputs
  DOTS = "dots"                    # keep matmul outputs (no batch dims)
  DOTS_WITH_BATCH = "dots_with_batch"


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """The sparse layers of one stack.

  Attributes:
    layer: an unbound `MoeLayer` holding the knobs of every sparse layer of
      the stack; each sparse layer is a copy (own weights) that the model
      completes (see `TransformerConfig.moe_layer`).
    sparse_every: the FFN of the last layer of every block of this many
      layers is an MoE layer (2: layers 1, 3, 5, ...; 1: every layer).
    extra_dense_ffn: ST-MoE: a dense FFN after each MoE FFN in the layer.
    extra_dense_ffn_dim: that FFN's hidden width (None: the model's
      mlp_dim).
    sequence_length: L, the tokens per sequence the layer's groups and
      capacity were set for (e.g. one group of L tokens per sequence with
      HF SwitchTransformers' capacity: `hf_switch.config_from_hf` with
      `encoder_length` / `decoder_length`); the model refuses a batch of
      another length (and so step-by-step decoding), naming this knob;
      `init` takes any length.
      None: any length, capacity per group of min(B * L, max_group_size)
      tokens.
  """
  layer: MoeLayer
  sparse_every: int = 2
  extra_dense_ffn: bool = False
  extra_dense_ffn_dim: Optional[int] = None
  sequence_length: Optional[int] = None

  def __post_init__(self):
    if not isinstance(self.layer, MoeLayer):
      raise ValueError("layer must be a moe_jax.moe.layer.MoeLayer; got "
                       f"layer={self.layer!r}")
    if self.extra_dense_ffn_dim is not None and self.extra_dense_ffn_dim < 1:
      raise ValueError("extra_dense_ffn_dim must be None or >= 1; got "
                       f"extra_dense_ffn_dim={self.extra_dense_ffn_dim}")
    if self.sequence_length is not None and self.sequence_length < 1:
      raise ValueError("sequence_length must be None or >= 1; got "
                       f"sequence_length={self.sequence_length}")

  def check_length(self, stack: str, length: int) -> None:
    """Raises ValueError, naming `{stack}_moe.sequence_length`, unless a
    batch of `length`-token sequences is one the capacity was set for."""
    if self.sequence_length is None or length == self.sequence_length:
      return
    raise ValueError(
        f"{stack}_moe.sequence_length={self.sequence_length}: the sparse "
        f"layers' groups and capacity were set for sequences of "
        f"{self.sequence_length} tokens, but this batch's {stack} sequences "
        f"have {length}; pad or cut the batch to {self.sequence_length} "
        f"tokens, or rebuild the config for {length} (for decoding step by "
        "step, use sequence_length=None)")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """A T5-style encoder-decoder or a decoder-only language model.

  Attributes:
    vocab_size: V (token 0 is padding).
    emb_dim: D.
    num_heads: attention heads H (query heads).
    head_dim: width of each head.
    num_kv_heads: key/value heads K (grouped-query attention: each shares
      H / K query heads); None: K = H (multi-head attention).
    norm_epsilon: added to the mean square in every RMSNorm (T5: 1e-6,
      Mixtral: 1e-5).
    mlp_dim: dense FFN hidden width.
    num_encoder_layers: 0 for decoder-only models.
    num_decoder_layers: decoder layers.
    architecture: `Architecture`.
    dropout_rate: dropout after attention / FFN and on embeddings.
    activation: dense FFN `Activation` (T5 v1.1: gated_gelu).
    logits_via_embedding: tie the output projection to the embedding.
    position_embedding: `PositionEmbedding`.
    relative_attention_num_buckets, relative_attention_max_distance: T5
      relative position buckets.
    rope_max_wavelength: base of the rotary frequencies.
    encoder_moe, decoder_moe: sparse layers of each stack; None: dense.
    scan_layers: scan over repeated layer blocks (same numbers, faster
      compiles for deep models).
    remat_policy: `RematPolicy` of each layer block.
    dtype: activation dtype ("float32", "bfloat16").
  """
  vocab_size: int
  emb_dim: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  num_decoder_layers: int
  num_encoder_layers: int = 0
  num_kv_heads: Optional[int] = None
  norm_epsilon: float = 1e-6
  architecture: Architecture = Architecture.ENCODER_DECODER
  dropout_rate: float = 0.0
  activation: Activation = Activation.GATED_GELU
  logits_via_embedding: bool = False
  position_embedding: PositionEmbedding = PositionEmbedding.RELATIVE
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  rope_max_wavelength: float = 10_000.0
  encoder_moe: Optional[MoeConfig] = None
  decoder_moe: Optional[MoeConfig] = None
  scan_layers: bool = False
  remat_policy: RematPolicy = RematPolicy.NONE
  dtype: str = "float32"

  def __post_init__(self):
    arch = knobs.choice(Architecture, "architecture", self.architecture)
    knobs.choice(Activation, "activation", self.activation)
    knobs.choice(PositionEmbedding, "position_embedding", self.position_embedding)
    knobs.choice(RematPolicy, "remat_policy", self.remat_policy)
    for knob in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim",
                 "num_decoder_layers"):
      if getattr(self, knob) < 1:
        raise ValueError(f"{knob} must be >= 1; got {knob}="
                         f"{getattr(self, knob)}")
    if self.num_kv_heads is not None and not (
        1 <= self.num_kv_heads <= self.num_heads and
        self.num_heads % self.num_kv_heads == 0):
      raise ValueError(f"num_kv_heads must divide num_heads={self.num_heads}; "
                       f"got num_kv_heads={self.num_kv_heads}")
    if not self.norm_epsilon > 0:
      raise ValueError(f"norm_epsilon must be > 0; got norm_epsilon="
                       f"{self.norm_epsilon}")
    if arch == Architecture.ENCODER_DECODER and self.num_encoder_layers < 1:
      raise ValueError("an encoder_decoder needs num_encoder_layers >= 1; got "
                       f"num_encoder_layers={self.num_encoder_layers}")
    if arch == Architecture.DECODER_ONLY and (self.num_encoder_layers or
                                              self.encoder_moe):
      raise ValueError("a decoder_only model has no encoder; got "
                       f"num_encoder_layers={self.num_encoder_layers}, "
                       f"encoder_moe={self.encoder_moe}")
    if not 0 <= self.dropout_rate < 1:
      raise ValueError(f"dropout_rate must be in [0, 1); got dropout_rate="
                       f"{self.dropout_rate}")
    try:
      jnp.dtype(self.dtype)
    except TypeError:
      raise ValueError(f"dtype must name a jax dtype; got dtype="
                       f"{self.dtype!r}") from None
    for stack, moe, layers in (("encoder", self.encoder_moe,
                                self.num_encoder_layers),
                               ("decoder", self.decoder_moe,
                                self.num_decoder_layers)):
      if moe is None:
        continue
      if moe.sparse_every < 1 or layers % moe.sparse_every:
        raise ValueError(
            f"{stack}_moe.sparse_every={moe.sparse_every} must be >= 1 and "
            f"divide num_{stack}_layers={layers}")
      try:
        self.moe_layer(stack)
      except ValueError as err:
        raise ValueError(f"{stack}_moe.layer: {err}") from None

  @property
  def kv_heads(self) -> int:
    """K: key/value heads."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def activation_dtype(self):
    return jnp.dtype(self.dtype)

  def block_size(self, stack: str) -> int:
    """Layers per repeated block of `stack` (the scan unit)."""
    moe = self.encoder_moe if stack == "encoder" else self.decoder_moe
    return 1 if moe is None else moe.sparse_every

  def num_layers(self, stack: str) -> int:
    return (self.num_encoder_layers if stack == "encoder" else
            self.num_decoder_layers)

  def moe(self, stack: str) -> Optional[MoeConfig]:
    return self.encoder_moe if stack == "encoder" else self.decoder_moe

  def moe_layer(self, stack: str) -> Optional[MoeLayer]:
    """The unbound sparse layer of `stack` as the model builds it.

    `MoeConfig.layer` with the model's part filled in: causal in the
    decoder, the model's activation dtype, and `mlp_dim` and the model's
    activation where the layer leaves expert_hidden_dim / activation None
    (mlp_dim / expert_segments for fine-grained experts).
    Like every copy of a MoeLayer, it re-runs the layer's checks.
    """
    moe = self.moe(stack)
    if moe is None:
      return None
    segments = moe.layer.expert_segments
    if moe.layer.expert_hidden_dim is None and self.mlp_dim % segments:
      raise ValueError(
          f"{stack}: expert_segments={segments} must divide the model's "
          f"mlp_dim={self.mlp_dim} (each expert is mlp_dim / "
          "expert_segments wide); or set expert_hidden_dim")
    return moe.layer.clone(
        causal=stack == "decoder", dtype=self.activation_dtype,
        expert_hidden_dim=(moe.layer.expert_hidden_dim or
                           self.mlp_dim // segments),
        activation=moe.layer.activation or self.activation)

  def with_moe_layers(self, **knobs) -> TransformerConfig:
    """This config with `knobs` (MoeLayer fields) set in every stack's layer."""
    def stack(moe):
      return None if moe is None else dataclasses.replace(
          moe, layer=moe.layer.clone(**knobs))
    return dataclasses.replace(self, encoder_moe=stack(self.encoder_moe),
                               decoder_moe=stack(self.decoder_moe))
