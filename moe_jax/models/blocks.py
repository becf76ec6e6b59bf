"""Transformer layers, repeated blocks, and stacks (unrolled or scanned).

Dimension names (moe_jax's glossary): B batch, L length, Le encoder length,
Lk key length (L, or the cache length when decoding), H heads, D model width.

A stack's layers are grouped into blocks of n = `MoeConfig.sparse_every`
layers; the last layer of each block has the MoE FFN (flaxformer's mixed
layout), so every block has the same parameter structure and blocks can be
scanned.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from moe_jax.moe import metric_names
from moe_jax.moe.experts import DenseFFN
from moe_jax.moe.layer import MoeStats
from moe_jax.models.attention import (NEG_INF, MultiHeadAttention,
                                      RelativePositionBias)
from moe_jax.models.config import (PositionEmbedding, RematPolicy,
                                   TransformerConfig)

Array = jax.Array

# Module names of a stack's blocks: one scanned module, or one per block.
SCANNED_BLOCKS = "blocks"


def block_name(index: int) -> str:
  """The module name of unrolled block `index`."""
  return f"block_{index}"


def per_block(stack_variables: Mapping[str, Any]) -> Array:
  """<[N, ...]> the one leaf per block of a stack's variables (of one
  collection written by one module per block, e.g. the MoE layer's
  `router_state`), in block order; N the stack's blocks.

  Raises:
    ValueError: a block holds more or fewer than one leaf.
  """
  if SCANNED_BLOCKS in stack_variables:
    return _only_leaf(stack_variables[SCANNED_BLOCKS], SCANNED_BLOCKS)
  names = [block_name(i) for i in range(len(stack_variables))]
  return jnp.stack([_only_leaf(stack_variables[n], n) for n in names])


def _only_leaf(tree: Any, name: str) -> Array:
  leaves = jax.tree.leaves(tree)
  if len(leaves) != 1:
    raise ValueError(f"{name} holds {len(leaves)} leaves, not one per block")
  return leaves[0]

_REMAT_POLICIES = {
    RematPolicy.FULL: None,
    RematPolicy.DOTS: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    RematPolicy.DOTS_WITH_BATCH: jax.checkpoint_policies.dots_saveable,
}


class RMSNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, no bias."""
  epsilon: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(
        nn.initializers.ones, ("embed",)), (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, -1, keepdims=True) +
                                 self.epsilon)
    return (normed * scale).astype(self.dtype)


@struct.dataclass
class LayerContext:
  """Everything a layer reads besides its input, shared by all layers.

  Attributes:
    self_bias: <float32>[B, 1 or H, L, K] mask + position bias of
      self-attention (K = cache length when decoding).
    positions: <int32>[B, L] positions of the layer's tokens (rotary
      embeddings of queries and of the keys written this call).
    token_mask: <float32>[B, L] 1 for real tokens (routed), 0 for padding.
    token_ids: <int32>[B, L] token ids (hash routers).
    encoded: <[B, Le, D]> encoder output for cross-attention, or None.
    cross_bias: <float32>[B, 1, L, Le] cross-attention mask, or None.
    decode_index: <int32>[B] cache slot of this step, or None.
  """
  self_bias: Array
  positions: Array
  token_mask: Array
  token_ids: Array
  encoded: Optional[Array] = None
  cross_bias: Optional[Array] = None
  decode_index: Optional[Array] = None


class TransformerLayer(nn.Module):
  """Pre-norm layer: self-attention, [cross-attention], dense or MoE FFN."""
  config: TransformerConfig
  stack: str
  sparse: bool

  @nn.compact
  def __call__(self, x: Array, ctx: LayerContext, deterministic: bool
               ) -> tuple[Array, Optional[MoeStats]]:
    cfg = self.config
    dtype = cfg.activation_dtype
    dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
    residual = lambda x, h: x + dropout(h, deterministic=deterministic)
    rope = (cfg.rope_max_wavelength if PositionEmbedding(
        cfg.position_embedding) == PositionEmbedding.ROPE else None)

    h = RMSNorm(cfg.norm_epsilon, dtype, name="pre_self_attention_norm")(x)
    h = MultiHeadAttention(
        cfg.num_heads, cfg.head_dim, cfg.kv_heads, cfg.dropout_rate, rope,
        dtype, name="self_attention")(
            h, h, ctx.self_bias, deterministic=deterministic,
            positions=ctx.positions, memory_positions=ctx.positions,
            decode_index=ctx.decode_index)
    x = residual(x, h)
    if ctx.encoded is not None:
      h = RMSNorm(cfg.norm_epsilon, dtype, name="pre_cross_attention_norm")(x)
      h = MultiHeadAttention(
          cfg.num_heads, cfg.head_dim, cfg.kv_heads, cfg.dropout_rate, None,
          dtype, name="encoder_decoder_attention")(
              h, ctx.encoded, ctx.cross_bias, deterministic=deterministic)
      x = residual(x, h)

    h = RMSNorm(cfg.norm_epsilon, dtype, name="pre_mlp_norm")(x)
    stats = None
    moe = cfg.moe(self.stack)
    if self.sparse:
      if not self.is_initializing():   # parameter shapes do not need L
        moe.check_length(self.stack, h.shape[1])
      h, stats = cfg.moe_layer(self.stack).copy(name="moe")(
          h, ctx.token_mask, deterministic=deterministic,
          token_ids=ctx.token_ids)
      x = residual(x, h)
      if moe.extra_dense_ffn:
        h = RMSNorm(cfg.norm_epsilon, dtype, name="pre_extra_mlp_norm")(x)
        h = DenseFFN(moe.extra_dense_ffn_dim or cfg.mlp_dim, cfg.activation,
                     cfg.dropout_rate, dtype, name="extra_mlp")(
                         h, deterministic=deterministic)
        x = residual(x, h)
    else:
      h = DenseFFN(cfg.mlp_dim, cfg.activation, cfg.dropout_rate, dtype,
                   name="mlp")(h, deterministic=deterministic)
      x = residual(x, h)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, stats


class Block(nn.Module):
  """`block_size` layers; the last one is sparse when the stack has MoE."""
  config: TransformerConfig
  stack: str

  @nn.compact
  def __call__(self, x: Array, ctx: LayerContext, deterministic: bool
               ) -> tuple[Array, Optional[MoeStats]]:
    size = self.config.block_size(self.stack)
    has_moe = self.config.moe(self.stack) is not None
    stats = None
    for i in range(size):
      sparse = has_moe and i == size - 1
      x, layer_stats = TransformerLayer(self.config, self.stack, sparse,
                                        name=f"layer_{i}")(x, ctx,
                                                           deterministic)
      stats = layer_stats if sparse else stats
    return x, stats


def _block_class(config: TransformerConfig):
  policy = RematPolicy(config.remat_policy)
  if policy == RematPolicy.NONE:
    return Block
  return nn.remat(Block, policy=_REMAT_POLICIES[policy],
                  prevent_cse=not config.scan_layers, static_argnums=(3,))


class Stack(nn.Module):
  """Blocks of one stack, its position bias, and the final norm.

  The relative position bias table is shared by every layer of the stack
  (T5). In decode mode the stack keeps the per-example step in the 'cache'
  collection.
  """
  config: TransformerConfig
  stack: str

  @nn.compact
  def __call__(self, x: Array, *, positions: Array,
               attention_mask: Array, token_ids: Array, token_mask: Array,
               encoded: Optional[Array] = None,
               cross_mask: Optional[Array] = None, deterministic: bool,
               decode: bool = False, prefill_lengths: Optional[Array] = None
               ) -> tuple[Array, Optional[MoeStats]]:
    """Runs the stack.

    Args:
      x: <[B, L, D]> embedded tokens.
      positions: <int32>[B, L] positions of the tokens.
      attention_mask: <bool>[B, L, L] which keys each query may see (full
        pass); ignored for single-token decode steps, which see the cache up
        to their own slot.
      token_ids, token_mask: passed to MoE layers.
      encoded, cross_mask: encoder output and <bool>[B, L, Le] mask.
      decode: use and update the key/value cache. A call whose length equals
        the cache length (or that creates the cache) is a full pass that
        fills it; a call with L = 1 is one step.
      prefill_lengths: <int32>[B] steps already in the cache after a full
        pass in decode mode (default 0: the cache is only being created).

    Returns:
      <[B, L, D]> outputs and the MoE stats with a leading block axis.
    """
    cfg = self.config
    batch, length = x.shape[:2]
    decode_index = None
    key_positions = positions
    if decode:
      step = self.variable("cache", "step", jnp.zeros, (batch,), jnp.int32)
      # <int32>[B, cache length]: its shape records the cache length. Batch
      # first like every cache entry, so beam search can repeat it per beam.
      slots = self.variable(
          "cache", "slots",
          lambda: jnp.broadcast_to(jnp.arange(length), (batch, length)))
      if length == 1 and not self.is_initializing():
        decode_index = step.value
        cache_length = slots.value.shape[1]
        # From the shape, not the values: callers may build the cache
        # abstractly and zero-fill it (moe_jax.train.evaluation does).
        key_positions = jnp.broadcast_to(jnp.arange(cache_length),
                                         (batch, cache_length))
        attention_mask = key_positions[:, None, :] <= decode_index[:, None,
                                                                   None]
        positions = decode_index[:, None]
        step.value = step.value + 1
      else:
        decode_index = jnp.zeros((batch,), jnp.int32)
        step.value = (jnp.zeros((batch,), jnp.int32) if prefill_lengths is
                      None else prefill_lengths.astype(jnp.int32))
    bias = jnp.where(attention_mask[:, None], 0.0, NEG_INF)
    if PositionEmbedding(cfg.position_embedding) == PositionEmbedding.RELATIVE:
      bias = bias + RelativePositionBias(
          cfg.num_heads, cfg.relative_attention_num_buckets,
          cfg.relative_attention_max_distance,
          bidirectional=self.stack == "encoder", name="relpos_bias")(
              positions, key_positions)
    cross_bias = (None if cross_mask is None else
                  jnp.where(cross_mask[:, None], 0.0, NEG_INF))
    ctx = LayerContext(self_bias=bias, positions=positions,
                       token_mask=token_mask.astype(jnp.float32),
                       token_ids=token_ids, encoded=encoded,
                       cross_bias=cross_bias, decode_index=decode_index)

    num_blocks = cfg.num_layers(self.stack) // cfg.block_size(self.stack)
    block = _block_class(cfg)
    if cfg.scan_layers:
      # The cache's layer axis is axis 1, so every cache entry stays batch
      # first (decoding repeats and reorders rows on axis 0 of each leaf).
      scanned = nn.scan(
          block, variable_axes={"params": 0, "cache": 1, "intermediates": 0,
                                metric_names.ROUTING: 0,
                                metric_names.ROUTER_STATE: 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast), length=num_blocks,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, stats = scanned(cfg, self.stack, name=SCANNED_BLOCKS)(x, ctx,
                                                         deterministic)
    else:
      per_block = []
      for i in range(num_blocks):
        x, block_stats = block(cfg, self.stack, name=block_name(i))(
            x, ctx, deterministic)
        per_block.append(block_stats)
      stats = (None if per_block[0] is None else
               jax.tree.map(lambda *a: jnp.stack(a), *per_block))
    x = RMSNorm(cfg.norm_epsilon, cfg.activation_dtype, name="final_norm")(x)
    x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
        x, deterministic=deterministic)
    return x, stats
