"""moe_jax: sparse Mixture-of-Experts T5 and decoder-only models in JAX.

Dimension names. Docstrings write shapes as `<dtype>[B, L, D]`; each letter
has one meaning across the package (a module's docstring lists the ones it
uses):

  B   batch: examples (rows) of a step
  L   sequence length; qualified as Le encoder, Ld decoder (also the decoded
      length), Li inputs, Lt targets, Lq queries and Lk keys of attention
  D   model width; Dh the width of one attention head
  H   attention heads
  F   hidden width of an FFN or expert (d_ff)
  I   in and O out width of one generic matmul (D and F, or F and D)
  V   vocabulary
  N   tokens routed by one MoE layer (B * L)
  G   token groups; routing, capacity and balancing are per group
  S   tokens per group (G * S is N padded up to whole groups)
  E   experts
  K   experts chosen per token (token choice); for DSelect-k, its selectors
  C   expert capacity: slots per expert in each group
  T   tokens in one expert's buffer on the capacity paths ([E, T, D])
  M   (token, expert) rows sorted by expert on the dropless path (N * K)
  R   sparse (MoE) layers of a model, encoder first, as stacked in
      `ModelOutput.moe_stats`
  W   beams of beam search
  P   processes of a multi-process job
  J   data shards of the input pipeline

Model code lives in `moe_jax.models` (the MoE layer in `moe_jax.moe`),
training in `moe_jax.train`, checkpoint inspection in `moe_jax.inspection`,
adapters in `moe_jax.t5x` and `moe_jax.interop`.
"""
