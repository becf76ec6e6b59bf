"""Parameters, FLOPs and memory of a gin-configured model, without memory.

  python -m moe_jax.flops --gin_file=gin/models/st_moe_32b.gin \
      [--gin.NUM_EXPERTS=128] [--input_length=512 --target_length=114] \
      [--batch=1024 --mesh=8,64,1 --optimizer=adafactor] [--json]

Every count comes from the real parameter tree, built abstractly with
`jax.eval_shape`, so a 269B-parameter model costs no memory. Parameters are
classified by their path in the tree.

FLOP convention: one multiply-add = 2 FLOPs; forward pass only (a training
step is about 3x). Counted: every matmul with a weight (attention
projections, FFNs, the experts a token actually uses, routers, logits) and
the two attention matmuls (scores and weighted values). Not counted:
softmax, norms, activations, the embedding lookup.

Published sizes this reproduces (tests/test_flops.py holds them within 2%):
  T5 v1.1 small / base / large / xl: 77M / 248M / 783M / 2.85B, the
    parameter counts of the released google/t5-v1_1-* checkpoints.
  Switch-Base-8 / Switch-Base-128: 0.62B / 7.42B, the parameter counts of the
    released google/switch-base-* checkpoints (Fedus et al. 2021).
  ST-MoE-32B: 269B (Zoph et al. 2022, "ST-MoE", Table 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from moe_jax import gin_utils
from moe_jax.models import (Architecture, TransformerConfig, build_model,
                            configured_model_config, dummy_batch)
from moe_jax.param_paths import flat_params

PARTS = ("embeddings", "attention", "dense_ffn", "experts", "routers",
         "norms_and_other")


def _part(path: str) -> str:
  if "/moe/experts/" in path:
    return "experts"
  if "/moe/router/" in path:
    return "routers"
  if path.startswith("embedder/"):
    return "embeddings"
  if "attention/" in path or "relpos_bias/" in path:
    return "attention"
  if ("/mlp/" in path or "/extra_mlp/" in path or
      "/moe/shared_experts/" in path):
    return "dense_ffn"
  return "norms_and_other"


def abstract_params(config: TransformerConfig) -> dict:
  """The parameter tree of `config` as ShapeDtypeStructs (no memory).

  Traced without a mesh, so the shard_map expert-parallel path (which needs
  one, and has the same parameters) is swapped for the single-device one.
  """
  config = config.with_moe_layers(expert_parallel=False)
  model = build_model(config)
  batch = dummy_batch(config, 1, 8, 8)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), **batch, enable_dropout=False))
  return nn.unbox(shapes)["params"]


def _leaves(params: dict) -> list[tuple[str, tuple[int, ...]]]:
  return [(name, leaf.shape) for name, leaf in flat_params(params).items()]


@dataclasses.dataclass(frozen=True)
class ModelCounts:
  """Parameter counts and forward FLOPs of one model.

  Attributes:
    total_params: all parameters.
    params_by_part: parameters per part (`PARTS`), summing to the total.
    router_params: parameters of the routers.
    active_params_per_token: parameters a token meets: everything but the
      experts, plus the share of expert parameters it is routed to (k of E
      for token choice; capacity_factor of E for expert choice).
    encoder_flops_per_token: forward FLOPs per encoder token (0 for
      decoder-only), attention over `input_length` keys.
    decoder_flops_per_token: forward FLOPs per decoder token, attention over
      the whole decoder length and the encoder, logits included.
    input_length, target_length: the lengths the attention terms assume.
    forward_flops: total forward FLOPs of one example of those lengths.
  """
  total_params: int
  params_by_part: dict
  router_params: int
  active_params_per_token: float
  encoder_flops_per_token: float
  decoder_flops_per_token: float
  input_length: int
  target_length: int
  forward_flops: float


def _expert_share(config: TransformerConfig, stack: str) -> float:
  """Experts a token of `stack` uses on average, divided by E."""
  layer = config.moe(stack).layer
  return layer.router.mean_experts_per_token(
      layer.eval_capacity_factor, layer.num_experts) / layer.num_experts


def count(config: TransformerConfig, input_length: int = 512,
          target_length: int = 114) -> ModelCounts:
  """Counts for `config`; decoder-only models see input + target tokens."""
  leaves = _leaves(abstract_params(config))
  by_part = {part: 0 for part in PARTS}
  # Matmul parameters met per token, by stack: "encoder", "decoder", "logits".
  matmul = {"encoder": 0.0, "decoder": 0.0, "logits": 0.0}
  active = 0.0
  for path, shape in leaves:
    size = int(np.prod(shape))
    part = _part(path)
    by_part[part] += size
    stack = path.split("/")[0]
    used = size * (_expert_share(config, stack) if part == "experts" else 1)
    active += used
    if part in ("attention", "dense_ffn", "experts", "routers") and (
        "relpos_bias" not in path):
      matmul[stack] += used
    elif path.startswith("embedder/logits_dense") or (
        path.startswith("embedder/token_embedder") and
        config.logits_via_embedding):
      matmul["logits"] += size
  heads = config.num_heads * config.head_dim
  decoder_only = Architecture(config.architecture) == \
      Architecture.DECODER_ONLY
  decoder_length = target_length + (input_length if decoder_only else 0)
  # Scores and weighted values: 2 matmuls x 2 FLOPs x keys x H * Dh.
  attend = lambda keys: 4 * keys * heads
  encoder = (0.0 if decoder_only else
             2 * matmul["encoder"] +
             config.num_encoder_layers * attend(input_length))
  cross = 0 if decoder_only else attend(input_length)
  decoder = (2 * (matmul["decoder"] + matmul["logits"]) +
             config.num_decoder_layers * (attend(decoder_length) + cross))
  encoder_tokens = 0 if decoder_only else input_length
  return ModelCounts(
      total_params=sum(by_part.values()),
      params_by_part=by_part,
      router_params=by_part["routers"],
      active_params_per_token=active,
      encoder_flops_per_token=encoder,
      decoder_flops_per_token=decoder,
      input_length=input_length,
      target_length=target_length,
      forward_flops=encoder_tokens * encoder + decoder_length * decoder)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device of one training step (a documented approximation).

  params: float32 weights; expert weights divided over the expert x model
    axes, other weights over the model axis, and everything also over data
    when `fsdp`.
  optimizer: Adafactor keeps factored second moments (about
    (rows + columns) per matrix, taken as 1% of the weights here, plus
    nothing for momentum); AdamW keeps two float32 moments per weight.
  gradients: one float32 copy of the (sharded) weights.
  activations: per layer, the residual stream and the FFN / expert hidden
    activations of the device's tokens (batch / (data * expert): the
    `batch` logical axis is split over both), in `activation_bytes`
    each; with full rematerialization only the layer inputs stay.
  """
  params: float
  optimizer: float
  gradients: float
  activations: float

  @property
  def total(self) -> float:
    return self.params + self.optimizer + self.gradients + self.activations


def memory_estimate(config: TransformerConfig, counts: ModelCounts,
                    mesh: tuple[int, int, int], batch: int,
                    optimizer: str = "adafactor", fsdp: bool = False,
                    activation_bytes: int = 2,
                    remat: bool = True) -> MemoryEstimate:
  """Per-device memory of `config` on a (data, expert, model) mesh."""
  data, expert, model = mesh
  if optimizer not in ("adafactor", "adamw"):
    raise ValueError(f"optimizer must be adafactor or adamw; got "
                     f"optimizer={optimizer!r}")
  experts = counts.params_by_part["experts"]
  others = counts.total_params - experts
  shards = data if fsdp else 1
  params = 4 * (experts / (expert * model) + others / model) / shards
  state = 0.01 * params if optimizer == "adafactor" else 2 * params
  if min(mesh) < 1:
    raise ValueError(f"mesh sizes must be >= 1; got mesh={mesh}")
  tokens = batch / (data * expert) * (counts.input_length +
                                      counts.target_length)
  layers = config.num_encoder_layers + config.num_decoder_layers
  per_layer = config.emb_dim if remat else (
      4 * config.emb_dim + 2 * config.mlp_dim / model)
  activations = activation_bytes * tokens * layers * per_layer
  return MemoryEstimate(params, state, params, activations)


def _table(counts: ModelCounts, memory: Optional[MemoryEstimate]) -> str:
  lines = [f"{'total parameters':<34}{counts.total_params:>20,}"]
  for part, size in counts.params_by_part.items():
    share = size / counts.total_params
    lines.append(f"  {part:<32}{size:>20,}  {share:6.1%}")
  lines += [
      f"{'active parameters per token':<34}"
      f"{counts.active_params_per_token:>20,.0f}",
      f"{'forward GFLOPs per encoder token':<34}"
      f"{counts.encoder_flops_per_token / 1e9:>20.3f}",
      f"{'forward GFLOPs per decoder token':<34}"
      f"{counts.decoder_flops_per_token / 1e9:>20.3f}",
      f"{'forward TFLOPs per example':<34}{counts.forward_flops / 1e12:>20.3f}"
      f"  (input {counts.input_length}, target {counts.target_length})",
      "FLOPs: multiply-add = 2, forward only",
  ]
  if memory is not None:
    lines.append("memory per device (GiB): " + ", ".join(
        f"{k} {v / 2**30:.2f}" for k, v in
        [*dataclasses.asdict(memory).items(), ("total", memory.total)]))
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  bindings, rest = gin_utils.split_gin_flags(argv)
  parser = argparse.ArgumentParser(prog="python -m moe_jax.flops",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--gin_file", action="append", default=[])
  parser.add_argument("--input_length", type=int, default=512)
  parser.add_argument("--target_length", type=int, default=114)
  parser.add_argument("--mesh", default=None,
                      help="data,expert,model sizes for a memory estimate")
  parser.add_argument("--batch", type=int, default=256,
                      help="global batch (examples) for the memory estimate")
  parser.add_argument("--optimizer", default="adafactor")
  parser.add_argument("--fsdp", action="store_true")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object")
  args = parser.parse_args(rest)
  gin_utils.parse(args.gin_file, bindings)
  config = configured_model_config()
  counts = count(config, args.input_length, args.target_length)
  memory = None
  if args.mesh:
    mesh = tuple(int(v) for v in args.mesh.split(","))
    if len(mesh) != 3:
      raise ValueError(f"mesh must be data,expert,model; got {args.mesh}")
    memory = memory_estimate(config, counts, mesh, args.batch,
                             args.optimizer, args.fsdp)
  if args.json:
    out = dataclasses.asdict(counts)
    if memory is not None:
      out["memory_bytes_per_device"] = {**dataclasses.asdict(memory),
                                        "total": memory.total}
    print(json.dumps(out))
  else:
    print(_table(counts, memory))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
