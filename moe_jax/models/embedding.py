"""Token embedding and the output projection (tied or separate)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.models.config import TransformerConfig

Array = jax.Array


class EmbeddingAndLogits(nn.Module):
  """Embeds token ids <int32>[B, L] and projects <[B, L, D]> to logits.

  Tied logits (`logits_via_embedding`) reuse the embedding table scaled by
  1 / sqrt(D), as T5 does; otherwise a separate <[D, V]> matrix (T5 v1.1).
  Logits are float32.
  """
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embedding = nn.Embed(
        cfg.vocab_size, cfg.emb_dim, dtype=cfg.activation_dtype,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")),
        name="token_embedder")
    if not cfg.logits_via_embedding:
      self.logits_dense = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=jnp.float32,
          kernel_init=nn.with_logical_partitioning(
              nn.initializers.variance_scaling(1.0, "fan_in",
                                               "truncated_normal"),
              ("embed", "vocab")), name="logits_dense")

  def embed(self, tokens: Array) -> Array:
    return self.embedding(tokens)

  def logits(self, x: Array) -> Array:
    if self.config.logits_via_embedding:
      x = x.astype(jnp.float32) / jnp.sqrt(self.config.emb_dim)
      return self.embedding.attend(x).astype(jnp.float32)
    return self.logits_dense(x.astype(jnp.float32))
