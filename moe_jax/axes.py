"""Axis names: the device mesh's and the logical ones arrays are tagged with.

Mesh axes name the devices (`moe_jax.partitioning.make_mesh`); logical axes
name array dimensions (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`), and `moe_jax.partitioning.logical_axis_rules`
maps each logical axis onto mesh axes. The logical names follow T5X's MoE
rules. Dimension letters as in `moe_jax.moe`: G groups, S tokens per group,
D model width, E experts, F expert hidden width, C expert capacity.

Imports nothing, so every module that shards can use it.
"""

# Mesh axes, in mesh order.
DATA = "data"
EXPERT = "expert"
MODEL = "model"
MESH_AXES = (DATA, EXPERT, MODEL)


class Logical:
  """Logical axis names (one per kind of array dimension)."""
  BATCH = "batch"
  LENGTH = "length"
  EMBED = "embed"
  MLP = "mlp"
  HEADS = "heads"
  KV = "kv"
  VOCAB = "vocab"
  RELPOS_BUCKETS = "relpos_buckets"
  EXPERT = "expert"
  EXPERT_MLP = "expert_mlp"
  EXPERT_REPLICAS = "expert_replicas"
  EXPERT_GROUP = "expert_group"
  UNMODELED = "unmodeled"


# Logical axes of the MoE layer's arrays.
# Grouped tokens [G, S, D].
GROUPED_TOKENS = (Logical.EXPERT_GROUP, Logical.LENGTH, Logical.EMBED)
# Expert buffers [E, G * C, D] (capacity paths): E over the expert devices,
# the groups' rows over the data devices, as GShard lays them out.
EXPERT_BUFFERS = (Logical.EXPERT, Logical.EXPERT_REPLICAS, Logical.EMBED)
# Expert weights [E, D, F] into the hidden layer and [E, F, D] out of it.
EXPERT_WI = (Logical.EXPERT, Logical.EMBED, Logical.EXPERT_MLP)
EXPERT_WO = (Logical.EXPERT, Logical.EXPERT_MLP, Logical.EMBED)
# Router weights [D, E]: 'unmodeled' keeps the small expert axis replicated.
ROUTER_KERNEL = (Logical.EMBED, Logical.UNMODELED)
