"""Device mesh, logical axis rules and parameter shardings.

The mesh has three named axes, ("data", "expert", "model"). Parameters and
activations carry logical axis names (set with `nn.with_logical_partitioning`
and `nn.with_logical_constraint`); `logical_axis_rules` maps those names onto
mesh axes. Names follow T5X's MoE rules (`expert`, `expert_mlp`,
`expert_replicas`, `unmodeled`, ...).

Expert parallelism with `jax.shard_map` (all-to-all of dispatched tokens) is
not implemented yet; with these rules XLA's SPMD partitioner shards the expert
weights over `expert` and inserts the collectives itself.
"""

import contextlib
import math
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "model")

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
  sizes = {"data": data, "expert": expert, "model": model}
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
      ("batch", ("data", "expert")),
      ("length", None),
      ("embed", "data" if fsdp else None),
      ("mlp", "model"),
      ("heads", "model"),
      ("kv", None),
      ("vocab", "model"),
      ("relpos_buckets", None),
      ("expert", "expert"),
      ("expert_mlp", "model"),
      ("expert_replicas", "data"),
      ("expert_group", ("data", "expert")),
      ("unmodeled", None),
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


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
  """Applies `rules` and `mesh` while tracing `model.init` / `model.apply`."""
  with mesh, nn.logical_axis_rules(rules):
    yield


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that places a full copy on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())
