"""Weight import / export between moe_jax and other libraries."""
