"""Multi-head attention with T5 relative position bias or rotary embeddings,
and a key/value cache for step-by-step decoding.

Dimension names (moe_jax's glossary): B batch, L length, Lq query length,
Lk key length, H heads, Dh head width, D model width.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

NEG_INF = -1e10  # additive bias that removes a key from the softmax


# Drawn on the kernel flattened to 2-D [fan-in, fan-out], so fan-in counts
# all contracted axes (D for q/k/v, H * Dh for the output projection).
KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in",
                                               "truncated_normal")


class Projection(nn.Module):
  """x <[..., *in]> @ kernel <[*in, *features]>, without bias.

  The kernel is declared at full rank with one logical name per axis, so its
  sharding constraint holds under any active mesh. It is drawn from
  KERNEL_INIT on the flat [prod(in), prod(features)] shape and reshaped,
  which gives the values of `nn.DenseGeneral(features, axis=in axes)`.

  Attributes:
    features: output axes' sizes.
    num_in: number of trailing input axes contracted.
    names: logical names of the kernel's axes (in axes, then features).
    dtype: computation dtype; the kernel is stored in float32.
  """
  features: tuple[int, ...]
  num_in: int
  names: tuple[str, ...]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.num_in:]
    flat = (math.prod(in_shape), math.prod(self.features))

    def init(rng, shape, dtype=jnp.float32):
      return KERNEL_INIT(rng, flat, dtype).reshape(shape)

    kernel = self.param("kernel",
                        nn.with_logical_partitioning(init, self.names),
                        in_shape + tuple(self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    contract = (tuple(range(x.ndim - self.num_in, x.ndim)),
                tuple(range(self.num_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))


def relative_position_bucket(relative_position: Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Array:
  """T5's bucket of each (key - query) offset.

  Half the buckets (per direction, when bidirectional) hold exact small
  offsets; the rest cover offsets up to `max_distance` on a log scale; larger
  offsets share the last bucket.
  """
  distance = -relative_position  # > 0 when the key lies before the query
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    bucket = (distance < 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(distance)
  else:
    distance = jnp.maximum(distance, 0)
  max_exact = num_buckets // 2
  log_ratio = (jnp.log(jnp.maximum(distance, 1) / max_exact) /
               math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
  """Learned per-head bias of each bucketed offset; shared by a stack.

  Returns <float32>[B, H, Lq, Lk] for query positions `q_pos`
  <int32>[B, Lq] and key positions `k_pos` <int32>[B, Lk].
  """
  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool

  @nn.compact
  def __call__(self, q_pos: Array, k_pos: Array) -> Array:
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.1),
                                     ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), jnp.float32)
    buckets = relative_position_bucket(k_pos[:, None, :] - q_pos[:, :, None],
                                       self.bidirectional, self.num_buckets,
                                       self.max_distance)  # [B, Lq, Lk]
    return jnp.moveaxis(jnp.take(table, buckets, axis=1), 0, 1)


def apply_rope(x: Array, positions: Array, max_wavelength: float) -> Array:
  """Rotary embedding of x <[B, L, H, Dh]> at positions <int32>[B, L]."""
  half = x.shape[-1] // 2
  freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)
  # [B, L, 1, Dh / 2]
  angle = positions[..., None, None].astype(jnp.float32) * freq
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin,
                             second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


class MultiHeadAttention(nn.Module):
  """Attention without biases (T5). Scores are scaled by 1 / sqrt(Dh).

  Attributes:
    num_heads: H.
    head_dim: Dh.
    dropout_rate: dropout on the attention probabilities.
    rope_max_wavelength: rotary embeddings on q and k when set.
    dtype: activation dtype.
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  rope_max_wavelength: Optional[float] = None
  dtype: jnp.dtype = jnp.float32

  def _project(self, name: str, x: Array) -> Array:
    return Projection((self.num_heads, self.head_dim), 1,
                      ("embed", "heads", "kv"), self.dtype, name=name)(x)

  @nn.compact
  def __call__(self, queries: Array, memory: Array, bias: Array, *,
               deterministic: bool, positions: Optional[Array] = None,
               memory_positions: Optional[Array] = None,
               decode_index: Optional[Array] = None) -> Array:
    """Attends from queries <[B, Lq, D]> to memory <[B, Lk, D]>.

    Args:
      bias: additive <float32>[B or 1, H or 1, Lq, Lk] (masks and position
        bias); in decode mode Lk is the cache length.
      positions, memory_positions: <int32>[B, Lq] / [B, Lk] for rotary
        embeddings.
      decode_index: <int32>[B] step of each example; when given, the
        projected key/value of the single query token are written into the
        'cache' collection at that slot and attention runs over the whole
        cache.
    """
    q = self._project("query", queries)
    k = self._project("key", memory)
    v = self._project("value", memory)
    if self.rope_max_wavelength is not None:
      q = apply_rope(q, positions, self.rope_max_wavelength)
      k = apply_rope(k, memory_positions, self.rope_max_wavelength)
    if decode_index is not None:
      k, v = self._update_cache(k, v, decode_index)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                        preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(self.head_dim) + bias
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    return Projection((queries.shape[-1],), 2, ("heads", "kv", "embed"),
                      self.dtype, name="out")(out)

  def _update_cache(self, k: Array, v: Array, index: Array):
    """Writes one step's k, v <[B, 1, H, Dh]> at slot `index` <int32>[B].

    The cache (length = the input length) is created the first time the
    module runs in decode mode; a full-length call (cache creation, prefill)
    overwrites the whole cache. Returns the cached keys and values.
    """
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape,
                             k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape,
                             v.dtype)
    if k.shape[1] == cached_k.value.shape[1]:  # cache creation / prefill
      cached_k.value, cached_v.value = k, v
      return k, v
    slot = jax.nn.one_hot(index, cached_k.value.shape[1],
                          dtype=k.dtype)[:, :, None, None]  # [B, Lk, 1, 1]
    cached_k.value = cached_k.value * (1 - slot) + k * slot
    cached_v.value = cached_v.value * (1 - slot) + v * slot
    return cached_k.value, cached_v.value
