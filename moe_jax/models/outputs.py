"""What every model returns."""

from __future__ import annotations

from typing import Optional

from flax import struct
import jax
import jax.numpy as jnp

from moe_jax.moe.layer import MoeStats

Array = jax.Array


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
