"""Adapter that lets T5X train moe_jax models.

T5X is not on PyPI: it is imported lazily, only by `moe_jax.t5x.models`
functions that need it, so this package imports without it.

- `modules`: flax modules with T5X's module contracts (they return logits).
- `losses`: the MoE loss terms and `experts/...` metrics from `intermediates`.
- `models`: T5X model classes that add those terms (need t5x).
- `partitioning`: logical axis rules for T5X's 2-axis (data, model) mesh.
"""
