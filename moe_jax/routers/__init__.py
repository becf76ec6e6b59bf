"""Routers from the MoE literature, built on `moe_jax.routing.Router`.

Each module holds one router family and is selectable from gin
(`gin/routing/<name>.gin`).
"""
