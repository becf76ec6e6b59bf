"""What every model returns."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from flax import struct
import jax
import jax.numpy as jnp

from moe_jax.models.blocks import per_block
from moe_jax.moe.layer import MoeStats

Array = jax.Array

# The stacks in the order of the [sparse layers] axis of `moe_stats`.
STACKS = ("encoder", "decoder")


@struct.dataclass
class ModelOutput:
  """Logits and routing statistics of one forward pass.

  Attributes:
    logits: <float32>[B, Lt, V] (Lt: the decoder's, i.e. target, length).
    moe_stats: `MoeStats` whose fields have a leading [sparse layers] axis,
      encoder layers first, then decoder layers; None for a dense model.
  """
  logits: Array
  moe_stats: Optional[MoeStats] = None


def concat_stats(*stats: Optional[MoeStats]) -> Optional[MoeStats]:
  """Joins per-stack stats along the layer axis, skipping dense stacks."""
  present = [s for s in stats if s is not None]
  if not present:
    return None
  return jax.tree.map(lambda *a: jnp.concatenate(a), *present)


def per_sparse_layer(collection: Mapping[str, Any]) -> Array:
  """<[R, ...]> the one leaf per sparse layer of a variable collection that
  the MoE layers write (e.g. `router_state`: the <[R, E]> selection biases),
  in the order of `ModelOutput.moe_stats` (R sparse layers, encoder first).

  The collection nests the layers by module path (`encoder/block_3/...`,
  or `encoder/blocks/...` with a leading [blocks] axis when scanned), whose
  key order is not that order.
  """
  return jnp.concatenate([per_block(collection[stack]) for stack in STACKS
                          if stack in collection])
