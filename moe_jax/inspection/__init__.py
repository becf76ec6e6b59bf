"""Checkpoint and routing inspection; the entry point is `moe_jax.inspect`."""
