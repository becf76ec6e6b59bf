"""Attention masks from tokens, segments and prefixes (all <bool>), and
default positions.

Dimension names (moe_jax's glossary): B batch, L length, Lq query length,
Lk key length.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def real_tokens(tokens: Array, segment_ids: Optional[Array] = None) -> Array:
  """<bool>[B, L]: segment id > 0 when packed, else token id > 0."""
  return (segment_ids if segment_ids is not None else tokens) > 0


def decoder_real_tokens(tokens: Array, segment_ids: Optional[Array],
                        targets: Optional[Array], decode: bool) -> Array:
  """<bool>[B, L] real decoder positions.

  Decoder inputs start with token 0 (the start token), so they cannot mark
  padding: packed batches use segment ids, training batches their targets,
  and decode steps are always real.
  """
  if segment_ids is not None:
    return segment_ids > 0
  if targets is not None and not decode:
    return targets > 0
  return jnp.ones(tokens.shape, bool)


def attention_mask(q_real: Array, k_real: Array,
                   q_segments: Optional[Array] = None,
                   k_segments: Optional[Array] = None) -> Array:
  """<bool>[B, Lq, Lk]: real queries see real keys of their own segment."""
  mask = q_real[:, :, None] & k_real[:, None, :]
  if q_segments is not None and k_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  return mask


def causal_mask(length: int, prefix: Optional[Array] = None) -> Array:
  """<bool>[B or 1, L, L]: keys at or before the query.

  With `prefix` <[B, L]> (1 on the inputs of a prefix-LM example), tokens of
  the prefix also see each other in both directions.
  """
  positions = jnp.arange(length)
  mask = (positions[None, :, None] >= positions[None, None, :])
  if prefix is not None:
    in_prefix = prefix > 0
    mask = mask | (in_prefix[:, :, None] & in_prefix[:, None, :])
  return mask


def positions_or_default(tokens: Array, positions: Optional[Array]) -> Array:
  """<int32>[B, L] given positions, or 0..L-1 for every row."""
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
