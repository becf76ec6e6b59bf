"""Explicit expert parallelism: a dispatch path inside `jax.shard_map`.

Mesh axes ("data", "expert", "model") from `moe_jax.axes`. `wrap` runs any
dispatch path of `moe_jax.moe.dispatch.PATHS` unchanged on every device and
swaps only its experts (`ExpertFns`) for ones that exchange rows with the
devices owning the experts. Token groups <[G, S, D]> are split over
("data", "expert"), so each device holds G / (data * expert) groups; expert
weights <[E, D, F]> are split E over "expert" and F over "model". Routing
runs before, on the global arrays, so the function computed is the one of
the single-device layer.

Expert dropout: the layer's dropout key enters replicated and each device
folds in its linear position on the (data, expert, model) mesh, so every
device draws its own independent mask over the hidden activations it
computes (its experts' rows, its F shard): the same distribution as one
device's mask over the whole <[E, T, F]>, not the same mask.

Batched layout (einsum, scatter, expert choice): each device dispatches its
local groups into buffers <[E, G_local * C, D]>; one `all_to_all` over
"expert" sends expert e's rows to the device that owns e:
<[E / expert, expert * G_local * C, D]>. The local experts run, the second
matmul's partial sums over the F shards are `psum`med over "model", and a
second `all_to_all` returns the rows for the combine.

Grouped layout (dropless): each device sorts its local (token, choice) rows
<[M, D]> by expert, M = its N * K. An all-gather of the group sizes
<int32>[E] over "expert" (X devices, E * X integers) gives every device the
same `ExchangePlan`; a ragged all-to-all (`moe_jax.moe.ragged_all_to_all`)
then sends each expert's rows only to the device owning it, landing in a
receive buffer sorted by local expert (then source), so the local grouped
matmul runs on it directly; a second ragged all-to-all returns the results
to their rows, and a `psum` over "model" adds the F shards. The receive
buffer has `receive_rows` rows: X * M by default (dropless_receive_factor
None), room for every row, so nothing is dropped, or ceil(factor * M)
(at most X * M) when a factor is set: balanced routing fills 1 / factor of
it. Per-device activation memory is O(factor * M) rows, not the O(X * M) of
room for (or gathering) every device's rows. With a factor, each owner
fills its buffer by local expert, then source, then the source's row order,
and the rows that do not fit are not sent: `drop_overflow`, which the layer
runs on the decision before dispatch, marks their choices not dispatched
with gate 0, so they add nothing to the output, get no gradient, and count
in the layer's `MoeStats` like choices dropped over capacity.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe_jax.axes import DATA, EXPERT, MODEL
from moe_jax.moe.dispatch import DispatchPath, sort_by_expert
from moe_jax.moe.experts import ExpertDropout, ExpertFns, Weights
from moe_jax.moe.ragged_all_to_all import ragged_all_to_all
from moe_jax.moe.routing import RoutingDecision, TokenChoice

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


def _device_index(mesh) -> Array:
  """Inside `jax.shard_map` over `mesh`: this device's linear position on
  the (data, expert, model) axes."""
  index = jnp.zeros((), jnp.int32)
  for axis in (DATA, EXPERT, MODEL):
    index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
  return index


def receive_rows(num_rows: int, expert_shards: int,
                 receive_factor: Optional[float]) -> int:
  """Rows of a device's dropless receive buffer for the M rows each device
  sends: expert * M (every device's rows) when receive_factor is None,
  else ceil(receive_factor * M), at most expert * M."""
  worst = expert_shards * num_rows
  if receive_factor is None:
    return worst
  return min(worst, math.ceil(receive_factor * num_rows))


class ExchangePlan(NamedTuple):
  """Who sends which rows where in the dropless exchange; the same on
  every device of an "expert" slice of the mesh. X = expert axis size, L =
  E / X local experts; device o owns experts o * L .. o * L + L - 1.

  offsets: <int32>[X, E] where device s's rows of expert e start among its
    sorted rows.
  counts: <int32>[X, L, X] (owner o, local expert l, source s): rows s
    sends o for expert o * L + l.
  start: <int32>[X, L, X] where they start in o's receive buffer, which
    holds them by local expert, then source.
  accepted: <int32>[X, L, X] how many of them fit in that buffer (their
    first rows; counts, unless it overflowed).
  capacity: rows of each receive buffer (`receive_rows`).
  """
  offsets: Array
  counts: Array
  start: Array
  accepted: Array
  capacity: int


def _plan(group_sizes: Array, num_rows: int, local_experts: int,
          receive_factor: Optional[float]) -> ExchangePlan:
  """Inside `jax.shard_map`: the plan from this device's group sizes
  <int32>[E] of its M = `num_rows` rows (all-gathered over "expert")."""
  group_sizes = jax.lax.all_gather(group_sizes, EXPERT)  # [X, E]
  shards = group_sizes.shape[0]
  capacity = receive_rows(num_rows, shards, receive_factor)
  counts = jnp.transpose(
      group_sizes.reshape(shards, shards, local_experts), (1, 2, 0))
  flat = counts.reshape(shards, -1)
  start = (jnp.cumsum(flat, axis=1) - flat).reshape(counts.shape)
  return ExchangePlan(
      offsets=jnp.cumsum(group_sizes, axis=1) - group_sizes, counts=counts,
      start=start, accepted=jnp.clip(capacity - start, 0, counts),
      capacity=capacity)


def drop_overflow(decision: TokenChoice,
                  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
                  num_experts: int, receive_factor: float) -> TokenChoice:
  """`decision` for the global groups <[G, S, K]> with the choices whose
  rows do not fit in their owner's receive buffer of `receive_rows` rows
  marked not dispatched, gate 0: the rows the dropless exchange leaves out,
  from the same `ExchangePlan` (`mesh` as `check_mesh` returned it)."""
  local_experts = num_experts // mesh.shape[EXPERT]

  def body(expert_index, gates, dispatched):
    order, group_sizes = sort_by_expert(expert_index, num_experts)
    num_rows = order.shape[0]  # M, this device's
    plan = _plan(group_sizes, num_rows, local_experts, receive_factor)
    me = jax.lax.axis_index(EXPERT)
    pairs = expert_index.reshape(-1)
    # Each pair's position among this device's rows of its expert.
    rank = jnp.zeros_like(order).at[order].set(
        jnp.arange(num_rows, dtype=order.dtype))
    position = rank - plan.offsets[me][pairs]
    owner, local = jnp.divmod(pairs, local_experts)
    fits = (position < plan.accepted[owner, local, me]).reshape(
        expert_index.shape)
    return jnp.where(fits, gates, 0), dispatched & fits

  gates, dispatched = jax.shard_map(
      body, mesh=mesh, in_specs=GROUPS, out_specs=GROUPS)(
          decision.expert_index, decision.gates, decision.dispatched)
  return decision.replace(gates=gates, dispatched=dispatched)


def _exchanged(experts: ExpertFns, local_experts: int,
               receive_factor: Optional[float]) -> ExpertFns:
  """`experts` (holding the local weights) behind the exchanges over
  "expert" and the sum over "model" described in the module docstring."""

  def batched(weights: Weights, x: Array, dropout: ExpertDropout) -> Array:
    x = jax.lax.all_to_all(x, EXPERT, 0, 1, tiled=True)  # [E/X, X*T, D]
    y = jax.lax.psum(experts.batched_fn(weights, x, dropout), MODEL)
    return jax.lax.all_to_all(y, EXPERT, 1, 0, tiled=True)  # [E, T, D]

  def grouped(weights: Weights, rows: Array, group_sizes: Array,
              dropout: ExpertDropout) -> Array:
    num_rows = rows.shape[0]  # M, this device's
    plan = _plan(group_sizes, num_rows, local_experts, receive_factor)
    me = jax.lax.axis_index(EXPERT)
    # Out: slice e carries this device's rows of global expert e.
    to_owner = (plan.offsets[me], plan.accepted[:, :, me].reshape(-1),
                plan.start[:, :, me].reshape(-1))
    # Back: slice i * L + l carries device i's rows of local expert l.
    from_sources = (jnp.transpose(plan.start[me]).reshape(-1),
                    jnp.transpose(plan.accepted[me]).reshape(-1),
                    jax.lax.dynamic_slice_in_dim(
                        plan.offsets, me * local_experts, local_experts,
                        axis=1).reshape(-1))
    received = ragged_all_to_all(
        rows, jnp.zeros_like(rows, shape=(plan.capacity, rows.shape[1])),
        *to_owner, from_sources[1], axis_name=EXPERT)  # [capacity, D]
    out = experts.grouped_fn(weights, received,
                             jnp.sum(plan.accepted[me], axis=1), dropout)
    out = ragged_all_to_all(out, jnp.zeros_like(out, shape=rows.shape),
                            *from_sources, to_owner[1],
                            axis_name=EXPERT)  # [M, D]
    return jax.lax.psum(out, MODEL)

  return experts.replace(batched_fn=batched, grouped_fn=grouped,
                         buffer_axes=None)


def wrap(run: DispatchPath,
         mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
         receive_factor: Optional[float]) -> DispatchPath:
  """`run` inside `jax.shard_map` over `mesh` (see the module docstring).

  The result has `run`'s signature and computes the same function:
  (x <[G, S, D]>, decision for the global groups, E, experts, C) ->
  <[G, S, D]>, where `experts` holds the global weights. `mesh` is the one
  `check_mesh` returned for these E, G and F; `receive_factor` sizes the
  dropless receive buffers (`receive_rows`).
  """

  def sharded(x: Array, decision: RoutingDecision, num_experts: int,
              experts: ExpertFns, capacity) -> Array:
    local_experts = num_experts // mesh.shape[EXPERT]

    def body(x, decision, weights, dropout):
      local = experts.replace(weights=weights,
                              dropout=dropout.for_device(_device_index(mesh)))
      return run(x, decision, num_experts,
                 _exchanged(local, local_experts, receive_factor), capacity)

    weight_specs = {name: _weight_spec(name) for name in experts.weights}
    return jax.shard_map(
        body, mesh=mesh, in_specs=(GROUPS, GROUPS, weight_specs, P()),
        out_specs=GROUPS)(x, decision, experts.weights, experts.dropout)

  return sharded
