"""Explicit expert parallelism: a dispatch path inside `jax.shard_map`.

Mesh axes ("data", "expert", "model") from `moe_jax.axes`. `wrap` runs any
dispatch path of `moe_jax.moe.dispatch.PATHS` unchanged on every device and
swaps only its experts (`ExpertFns`) for ones that exchange rows with the
devices owning the experts. Token groups <[G, S, D]> are split over
("data", "expert"), so each device holds G / (data * expert) groups; expert
weights <[E, D, F]> are split E over "expert" and F over "model". Routing
runs before, on the global arrays, so the function computed is the one of
the single-device layer.

Batched layout (einsum, scatter, expert choice): each device dispatches its
local groups into buffers <[E, G_local * C, D]>; one `all_to_all` over
"expert" sends expert e's rows to the device that owns e:
<[E / expert, expert * G_local * C, D]>. The local experts run, the second
matmul's partial sums over the F shards are `psum`med over "model", and a
second `all_to_all` returns the rows for the combine.

Grouped layout (dropless): each device sorts its local (token, choice) rows
<[M, D]> by expert; the rows and group sizes are all-gathered over
"expert", each device sorts the gathered rows of its own experts first and
runs the grouped matmul on them (the other rows fall past the group sizes
and come out 0), and a reduce-scatter over "expert" returns every row, which
exactly one device computed. This stays dropless with static shapes: a
ragged all-to-all would move fewer bytes but needs per-device receive sizes
known ahead (an upper bound, i.e. a capacity, or a second exchange of
counts); the all-gather moves expert - 1 times the local M = N * K rows,
which is small next to the expert weights at moderate expert axis sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.axes import DATA, EXPERT, MODEL
from moe_jax.moe.dispatch import DispatchPath
from moe_jax.moe.experts import ExpertFns, Weights
from moe_jax.moe.routing import RoutingDecision

Array = jax.Array

GROUPS = P((DATA, EXPERT))


def _weight_spec(name: str) -> P:
  return P(EXPERT, MODEL, None) if name == "wo" else P(EXPERT, None, MODEL)


def context_mesh() -> jax.sharding.AbstractMesh:
  """The mesh set by `jax.set_mesh` (as `moe_jax.partitioning.axis_rules`
  does); empty if none."""
  return jax.sharding.get_abstract_mesh()


def group_shards() -> int:
  """data * expert size of the context mesh (1 without one): the token
  groups of an expert-parallel layer must split evenly over them."""
  mesh = context_mesh()
  if mesh.empty or not {DATA, EXPERT} <= set(mesh.axis_names):
    return 1
  return mesh.shape[DATA] * mesh.shape[EXPERT]


def check_mesh(num_experts: int, num_groups: int, hidden_dim: int
               ) -> jax.sharding.Mesh | jax.sharding.AbstractMesh:
  """The context mesh, after checking that E, G and F split over it.

  Raises:
    ValueError: no mesh, or E, G or F does not split over its mesh axes.
  """
  mesh = context_mesh()
  if mesh.empty or not {DATA, EXPERT, MODEL} <= set(mesh.axis_names):
    raise ValueError(
        "expert_parallel=True needs a mesh with axes ('data', 'expert', "
        "'model') set while tracing: use moe_jax.partitioning.axis_rules(mesh,"
        f" rules) or jax.set_mesh; got mesh={mesh}")
  experts = mesh.shape[EXPERT]
  if num_experts % experts:
    raise ValueError(
        f"expert_parallel=True: num_experts={num_experts} is not divisible "
        f"by the mesh's expert axis size {experts}")
  shards = mesh.shape[DATA] * experts
  if num_groups % shards:
    raise ValueError(
        f"expert_parallel=True: the {num_groups} token groups do not split "
        f"over data * expert = {shards} devices")
  if hidden_dim % mesh.shape[MODEL]:
    raise ValueError(
        f"expert_parallel=True: expert_hidden_dim={hidden_dim} is not "
        f"divisible by the mesh's model axis size {mesh.shape[MODEL]}")
  return mesh


def _exchanged(experts: ExpertFns, local_experts: int) -> ExpertFns:
  """`experts` (holding the local weights) behind the exchanges over
  "expert" and the sum over "model" described in the module docstring."""

  def batched(weights: Weights, x: Array) -> Array:
    x = jax.lax.all_to_all(x, EXPERT, 0, 1, tiled=True)  # [E/X, X*T, D]
    y = jax.lax.psum(experts.batched_fn(weights, x), MODEL)
    return jax.lax.all_to_all(y, EXPERT, 1, 0, tiled=True)  # [E, T, D]

  def grouped(weights: Weights, rows: Array, group_sizes: Array) -> Array:
    all_rows = jax.lax.all_gather(rows, EXPERT)  # [X, M, D]
    all_sizes = jax.lax.all_gather(group_sizes, EXPERT)  # [X, E]
    first = jax.lax.axis_index(EXPERT) * local_experts
    row = jnp.arange(rows.shape[0])
    expert = jax.vmap(lambda ends: jnp.searchsorted(ends, row, side="right"))(
        jnp.cumsum(all_sizes, axis=1))  # [X, M]
    local = expert - first
    # Local experts' rows first, in expert order; all others after them.
    key = jnp.where((local >= 0) & (local < local_experts), local,
                    local_experts).reshape(-1)
    order = jnp.argsort(key, stable=True)  # [X * M]
    local_sizes = jnp.sum(jax.lax.dynamic_slice_in_dim(
        all_sizes, first, local_experts, axis=1), axis=0)  # [E / X]
    out = experts.grouped_fn(
        weights, jnp.take(all_rows.reshape(-1, rows.shape[1]), order, axis=0),
        local_sizes)
    out = jnp.zeros_like(out).at[order].set(out).reshape(all_rows.shape)
    out = jax.lax.psum_scatter(out, EXPERT, scatter_dimension=0)  # [M, D]
    return jax.lax.psum(out, MODEL)

  return experts.replace(batched_fn=batched, grouped_fn=grouped,
                         buffer_axes=None)


def wrap(run: DispatchPath,
         mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> DispatchPath:
  """`run` inside `jax.shard_map` over `mesh` (see the module docstring).

  The result has `run`'s signature and computes the same function:
  (x <[G, S, D]>, decision for the global groups, E, experts, C) ->
  <[G, S, D]>, where `experts` holds the global weights. `mesh` is the one
  `check_mesh` returned for these E, G and F.
  """

  def sharded(x: Array, decision: RoutingDecision, num_experts: int,
              experts: ExpertFns, capacity) -> Array:
    local_experts = num_experts // mesh.shape[EXPERT]

    def body(x, decision, weights):
      local = _exchanged(experts.replace(weights=weights), local_experts)
      return run(x, decision, num_experts, local, capacity)

    weight_specs = {name: _weight_spec(name) for name in experts.weights}
    return jax.shard_map(body, mesh=mesh,
                         in_specs=(GROUPS, GROUPS, weight_specs),
                         out_specs=GROUPS)(x, decision, experts.weights)

  return sharded
