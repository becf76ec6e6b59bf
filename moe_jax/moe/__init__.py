"""The MoE core: routers, dispatch paths, experts and the MoE layer.

Modules, from the layer down:
  layer            `MoeLayer` and `MoeStats`: group, route, dispatch, combine.
  expert_parallel  the dispatch inside `jax.shard_map` (all-to-all).
  routers/         every router (token choice, expert choice, literature).
  dispatch         capacity, grouping, the einsum/scatter/dropless paths.
  capture          per-token routing for inspection.
  routing          decision types and the `Router` base.
  experts          stacked expert MLPs.
  losses           load balancing, z-loss, importance.
  metric_names     the names every writer and reader of MoE metrics share.

Importing this package pulls in jax and flax only (no tensorflow, seqio or
torch).
"""
