"""Explicit expert parallelism: the MoE dispatch inside `jax.shard_map`.

Mesh axes ("data", "expert", "model") as in `moe_jax.partitioning`. Token
groups <[G, S, D]> are split over ("data", "expert"), so each device holds
G / (data * expert) groups; expert weights <[E, D, F]> are split E over
"expert" and F over "model". Routing runs before, on the global arrays, so
the function computed is the one of the single-device layer.

Capacity paths (einsum, scatter, expert choice): each device builds its
local dispatched buffers <[E, G_local * C, D]> with the usual dispatch code,
then one `all_to_all` over "expert" sends expert e's rows to the device that
owns e: <[E / expert, expert * G_local * C, D]>. The local experts run, the
second matmul's partial sums over the F shards are `psum`med over "model",
and a second `all_to_all` returns the rows for the combine.

Dropless path: all-gather the tokens and routing decisions over "expert",
run a grouped matmul (`ragged_dot`) over the rows routed to the local
experts, and reduce-scatter the outputs back over "expert". This stays
dropless with static shapes: a ragged all-to-all would move fewer bytes but
needs per-device receive sizes known ahead (an upper bound, i.e. a capacity,
or a second exchange of counts); the all-gather moves expert-1 times the
local tokens, which is small next to the expert weights at moderate expert
axis sizes. Rows of non-local experts are sorted last and masked, so each
device multiplies only its experts' weights, but the row buffer has static
size N * K for all experts.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax._src import mesh as mesh_lib
from jax.sharding import PartitionSpec as P

from moe_jax.moe.dispatch import (Dispatch, dropless_dispatch, einsum_dispatch,
                                  scatter_dispatch)
from moe_jax.moe.experts import Activation, mlp
from moe_jax.moe.routing import RoutingDecision

Array = jax.Array

DATA, EXPERT, MODEL = "data", "expert", "model"
GROUPS = P((DATA, EXPERT))


def _weight_spec(name: str) -> P:
  return P(EXPERT, MODEL, None) if name == "wo" else P(EXPERT, None, MODEL)


def context_mesh() -> jax.sharding.Mesh | jax.sharding.AbstractMesh:
  """The mesh set by `jax.set_mesh`, else by `with mesh:`.

  `moe_jax.partitioning.axis_rules` uses `with mesh:` (the models' logical
  constraints rely on it); jax 0.10 exposes that mesh only through
  `thread_resources`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    mesh = mesh_lib.thread_resources.env.physical_mesh
  return mesh


def group_shards() -> int:
  """data * expert size of the context mesh (1 without one): the token
  groups of an expert-parallel layer must split evenly over them."""
  mesh = context_mesh()
  if mesh.empty or not {DATA, EXPERT} <= set(mesh.axis_names):
    return 1
  return mesh.shape[DATA] * mesh.shape[EXPERT]


def check_mesh(num_experts: int, num_groups: int, hidden_dim: int
                ) -> tuple[jax.sharding.Mesh | jax.sharding.AbstractMesh, int]:
  """The context mesh and its expert axis size, after checking divisibility.

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
  return mesh, experts


def _local_mlp(x: Array, weights: dict, activation: Activation,
               group_sizes: Optional[Array] = None) -> Array:
  """Local experts on local F shards, summed over "model"."""
  if group_sizes is None:
    matmul = lambda a, w: jnp.einsum("etd,edf->etf", a, w)
  else:
    matmul = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)
  y = mlp(x, activation, lambda name, _: weights[name], matmul, lambda h: h)
  return jax.lax.psum(y, MODEL)


def expert_parallel_dispatch(tokens: Array, weights: dict,
                             decision: RoutingDecision, *,
                             dispatch: Dispatch, num_experts: int,
                             capacity: int, activation: Activation) -> Array:
  """Dispatch, experts and combine over the context mesh.

  Args:
    tokens: <[G, S, D]> grouped tokens.
    weights: expert weights {name: <[E, D, F]> ("wi*") or <[E, F, D]> ("wo")}.
    decision: the router's decision for the global <[G, ...]> groups.
    dispatch: the dispatch path (see `moe_jax.moe.dispatch`).
    num_experts: E.
    capacity: C (unused on the dropless path).
    activation: expert activation.

  Returns:
    <[G, S, D]>, equal to the single-device dispatch of the same path.
  """
  hidden_dim = weights["wo"].shape[1]
  mesh, num_shards = check_mesh(num_experts, tokens.shape[0], hidden_dim)
  local_experts = num_experts // num_shards

  def capacity_path(tokens, decision, weights):
    def expert_fn(x):  # [E, T, D] -> [E / expert, expert * T, D] and back.
      x = jax.lax.all_to_all(x, EXPERT, 0, 1, tiled=True)
      y = _local_mlp(x, weights, activation)
      return jax.lax.all_to_all(y, EXPERT, 1, 0, tiled=True)
    path = einsum_dispatch if dispatch == Dispatch.EINSUM else scatter_dispatch
    return path(tokens, decision, num_experts, expert_fn, capacity)

  def dropless_path(tokens, decision, weights):
    gather = lambda a: jax.lax.all_gather(a, EXPERT, axis=0, tiled=True)
    tokens = gather(tokens)
    decision = jax.tree.map(gather, decision)
    first = jax.lax.axis_index(EXPERT) * local_experts
    # Local experts become 0 .. local_experts - 1 and sort first.
    key = (decision.expert_index - first) % num_experts
    local = key < local_experts
    decision = decision.replace(
        expert_index=key, gates=jnp.where(local, decision.gates, 0.0))

    def grouped(rows, group_sizes):
      sizes = group_sizes[:local_experts]
      y = _local_mlp(rows, weights, activation, sizes)
      valid = jnp.arange(rows.shape[0]) < jnp.sum(sizes)
      return jnp.where(valid[:, None], y, 0.0)

    out = dropless_dispatch(tokens, decision, num_experts, grouped)
    return jax.lax.psum_scatter(out, EXPERT, scatter_dimension=0, tiled=True)

  body = dropless_path if dispatch == Dispatch.DROPLESS else capacity_path
  weight_specs = {name: _weight_spec(name) for name in weights}
  return jax.shard_map(body, mesh=mesh,
                       in_specs=(GROUPS, GROUPS, weight_specs),
                       out_specs=GROUPS)(tokens, decision, weights)
