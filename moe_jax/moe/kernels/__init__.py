"""Grouped-matmul implementations, one module per `GroupedMatmul` value.

Each module defines `grouped_matmul(lhs, rhs, group_sizes)` with the
contract in `moe_jax.moe.grouped_matmul`; that module picks one by name.
"""
