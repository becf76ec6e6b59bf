"""Helpers of the inspection tests: a byte vocabulary without seqio, and
the inputs each MoE layer sees."""

import flax.linen as nn
import numpy as np

from moe_jax.moe.layer import MoeLayer


def moe_inputs(checkpoint, batch):
  """(x [B, L, D], padding mask [B, L]) fed to each MoE layer, call order."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, MoeLayer) and (
        context.method_name == "__call__"):
      seen.append((np.asarray(args[0], np.float64), np.asarray(args[1])))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    checkpoint.model.apply({"params": checkpoint.params}, **batch,
                           enable_dropout=False)
  return seen


class Bytes:
  """UTF-8 bytes shifted by 3 (seqio ByteVocabulary's ids), without seqio."""
  eos_id = 1

  def encode(self, s):
    return [b + 3 for b in s.encode()]

  def decode(self, ids):
    return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")
