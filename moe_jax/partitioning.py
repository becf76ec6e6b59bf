"""Device mesh, logical axis rules and parameter shardings.

The mesh has three named axes, ("data", "expert", "model"). Parameters and
activations carry logical axis names (set with `nn.with_logical_partitioning`
and `nn.with_logical_constraint`); `logical_axis_rules` maps those names onto
mesh axes. Both sets of names are defined in `moe_jax.axes` and follow
T5X's MoE rules (`expert`, `expert_mlp`, `expert_replicas`, `unmodeled`, ...).

By default XLA's SPMD partitioner shards the MoE layer from these rules: the
expert weights over `expert` and the expert buffers [E, G * C, D] over
(`expert`, `data`), inserting the all-to-alls itself. `MoeLayer.
expert_parallel` instead runs the dispatch inside `jax.shard_map` with
explicit collectives (`moe_jax.moe.expert_parallel`).
"""

import contextlib
import math
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax.axes import DATA, EXPERT, MESH_AXES, MODEL, Logical

LogicalRules = tuple[tuple[str, Optional[Any]], ...]


@gin.configurable
def make_mesh(data: int = -1, expert: int = 1, model: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the ("data", "expert", "model") mesh.

  Args:
    data: size of the data axis; at most one size may be -1 (fills the rest).
    expert: size of the expert axis.
    model: size of the model (tensor) axis.
    devices: the devices to use; all of `jax.devices()` by default.

  Returns:
    A `Mesh` of shape [data, expert, model].
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {DATA: data, EXPERT: expert, MODEL: model}
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"make_mesh: {name}={size} must be positive or -1.")
  fill = [name for name, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise ValueError(f"make_mesh: only one axis may be -1, got {fill}.")
  known = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if len(devices) % known:
      raise ValueError(f"make_mesh: {len(devices)} devices are not divisible "
                       f"by the fixed axes' product {known}.")
    sizes[fill[0]] = len(devices) // known
  total = math.prod(sizes.values())
  if total != len(devices):
    raise ValueError(f"make_mesh: mesh {sizes} needs {total} devices, "
                     f"{len(devices)} are available.")
  shape = tuple(sizes[name] for name in MESH_AXES)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


@gin.configurable
def logical_axis_rules(fsdp: bool = False) -> LogicalRules:
  """Logical-to-mesh axis rules for the dense and sparse models.

  Args:
    fsdp: if True, the embedding dimension of large weights is also sharded
      over `data` (FSDP-style); activations keep `embed` unsharded.

  Returns:
    A tuple of (logical name, mesh axis or None) pairs for
    `nn.logical_axis_rules` / `nn.logical_to_mesh_sharding`.
  """
  return (
      (Logical.BATCH, (DATA, EXPERT)),
      (Logical.LENGTH, None),
      (Logical.EMBED, DATA if fsdp else None),
      (Logical.MLP, MODEL),
      (Logical.HEADS, MODEL),
      (Logical.KV, None),
      (Logical.VOCAB, MODEL),
      (Logical.RELPOS_BUCKETS, None),
      (Logical.EXPERT, EXPERT),
      (Logical.EXPERT_MLP, MODEL),
      (Logical.EXPERT_REPLICAS, DATA),
      (Logical.EXPERT_GROUP, (DATA, EXPERT)),
      (Logical.UNMODELED, None),
  )


def shardings_for(abstract_tree: Any, mesh: Mesh,
                  rules: LogicalRules) -> Any:
  """`NamedSharding`s for a tree of (abstract) params or optimizer state.

  Leaves boxed with `nn.LogicallyPartitioned` get the sharding their logical
  names map to; any other leaf (step counters, unboxed scalars) is replicated.
  Optimizer states built by optax from boxed params keep the boxes, so the same
  call covers them.
  """
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divides(knob: str, value: int, logical_axis: str, mesh: Mesh,
                  rules: LogicalRules) -> None:
  """Checks that `value` (the size of an array dimension with logical axis
  `logical_axis`, set by `knob`) splits evenly over the mesh axes that axis
  maps to, so the error names the knob before anything compiles (instead
  of JAX's IndivisibleError at the first step)."""
  axes = nn.logical_to_mesh_axes((logical_axis,), rules)[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  devices = math.prod(mesh.shape[a] for a in axes)
  if value % devices:
    raise ValueError(
        f"{knob}={value} must be a multiple of {devices}: the '{logical_axis}'"
        f" dimension is split over mesh axes {tuple(axes)} "
        f"({', '.join(f'{a}={mesh.shape[a]}' for a in axes)})")


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
  """Applies `rules` and `mesh` while tracing `model.init` / `model.apply`.

  The mesh is set with `jax.set_mesh`, which flax's logical constraints and
  `moe_jax.moe.expert_parallel` read (as the abstract mesh while tracing).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that places a full copy on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def optimizer_state_shardings(abstract_state: Any, abstract_params: Any,
                              param_shardings: Any, mesh: Mesh) -> Any:
  """`NamedSharding`s for an optax state built from unboxed params.

  A state leaf whose path ends with a parameter's path and that has the
  parameter's shape (Adam moments, unfactored Adafactor moments) takes the
  parameter's sharding; every other leaf (counts, factored row / column
  statistics, which are small) is replicated.
  """
  by_path = {}
  for (path, param), sharding in zip(
      jax.tree_util.tree_leaves_with_path(abstract_params),
      jax.tree.leaves(param_shardings)):
    by_path[tuple(str(k) for k in path)] = (param.shape, sharding)

  def leaf_sharding(path, leaf):
    keys = tuple(str(k) for k in path)
    for start in range(len(keys)):
      match = by_path.get(keys[start:])
      if match is not None and match[0] == leaf.shape:
        return match[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)
