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
buffer has ceil(dropless_receive_factor * M) rows (`receive_rows`, at most
X * M): balanced routing fills 1 / factor of it. Per-device activation
memory is O(M) rows, not the O(X * M) of gathering every device's rows.
More rows sent to one device than its buffer holds is a run-time
ValueError naming the knob (a host callback; the rows that did not fit
would come back as 0, never written out of bounds).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from moe_jax.axes import DATA, EXPERT, MODEL
from moe_jax.moe.dispatch import DispatchPath
from moe_jax.moe.experts import ExpertDropout, ExpertFns, Weights
from moe_jax.moe.ragged_all_to_all import ragged_all_to_all
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


def _device_index(mesh) -> Array:
  """Inside `jax.shard_map` over `mesh`: this device's linear position on
  the (data, expert, model) axes."""
  index = jnp.zeros((), jnp.int32)
  for axis in (DATA, EXPERT, MODEL):
    index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
  return index


def receive_rows(num_rows: int, expert_shards: int,
                 receive_factor: Optional[float]) -> int:
  """Rows of a device's dropless receive buffer: ceil(receive_factor * M)
  for the M rows each device sends, at most expert * M (every device's
  rows); expert * M when receive_factor is None."""
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
  accepted: <int32>[X, L, X] how many of them fit in that buffer (counts,
    unless it overflowed).
  capacity: rows of each receive buffer (`receive_rows`).
  """
  offsets: Array
  counts: Array
  start: Array
  accepted: Array
  capacity: int


def _plan(group_sizes: Array, local_experts: int,
          capacity: int) -> ExchangePlan:
  """The plan from every device's group sizes <int32>[X, E]."""
  shards = group_sizes.shape[0]
  counts = jnp.transpose(
      group_sizes.reshape(shards, shards, local_experts), (1, 2, 0))
  flat = counts.reshape(shards, -1)
  start = (jnp.cumsum(flat, axis=1) - flat).reshape(counts.shape)
  return ExchangePlan(
      offsets=jnp.cumsum(group_sizes, axis=1) - group_sizes, counts=counts,
      start=start, accepted=jnp.clip(capacity - start, 0, counts),
      capacity=capacity)


def _checked(plan: ExchangePlan, num_rows: int,
             receive_factor: Optional[float]) -> ExchangePlan:
  """`plan`, after a host callback that raises a ValueError naming
  `dropless_receive_factor` when some device was sent more rows than its
  receive buffer holds. Every device computes the same flag and the
  exchanges wait for the callback's (zero) result, so all devices stop at
  the same point, before any collective that could wait on a stopped one."""

  def check(sent):
    owner = int(np.argmax(sent))
    if sent[owner] > plan.capacity:
      raise ValueError(
          f"expert_parallel dropless: device {owner} of the 'expert' mesh "
          f"axis was sent {sent[owner]} rows, more than its receive buffer "
          f"of {plan.capacity} = ceil(dropless_receive_factor="
          f"{receive_factor} * {num_rows}) rows; set "
          f"MoeLayer.dropless_receive_factor >= {sent[owner] / num_rows:.3g} "
          "(None: room for every row)")
    return np.zeros((), np.int32)

  # pure_callback (not io_callback, whose effect remat refuses): the check
  # is a function of its input; a remat may run it twice.
  zero = jax.pure_callback(check, jax.ShapeDtypeStruct((), jnp.int32),
                           jnp.sum(plan.counts, axis=(1, 2)))
  # Every collective of the exchange reads the result (XLA may run
  # independent work concurrently, so order alone would not hold them).
  return plan._replace(offsets=plan.offsets + zero, start=plan.start + zero,
                       accepted=plan.accepted + zero)


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
    plan = _checked(_plan(
        jax.lax.all_gather(group_sizes, EXPERT), local_experts,
        receive_rows(num_rows, group_sizes.shape[0] // local_experts,
                     receive_factor)), num_rows, receive_factor)
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
