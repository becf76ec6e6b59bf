"""The models an experiment compares: a dense T5 and FLOP-matched sparse T5s.

A `ModelSpec` names a routing strategy (a gin/routing/*.gin file, or "dense")
and a number of experts; `model_config` parses the repository's gin files for
it, so the experiment trains exactly the models `python -m moe_jax.main`
would.

FLOP matching (`flop_matched`): sparse models are made to cost the dense
model's forward FLOPs per example (moe_jax.flops: a token pays for the k
experts it is routed to, or capacity_factor experts under expert choice)
by solving their expert width; ST-MoE's extra dense FFN after each MoE FFN
is as wide as its experts, so every model keeps the dense model's other
FFNs. Every sparse model shares `SparseSettings` (routing loss weights,
expert slots per routing choice); `check_matched` refuses models that
differ in anything their variant does not vary.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import gin

from moe_jax import flops, gin_utils
from moe_jax.models import (MoeConfig, TransformerConfig,
                            configured_model_config)
from moe_jax.train.objective import LossConfig

DENSE = "dense"
ROUTINGS = ("switch_top1", "gshard_top2", "expert_choice", "st_moe")
_DENSE_FILE = "gin/models/t5_1_1_tiny.gin"
_SPARSE_FILE = "gin/models/t5_1_1_tiny_moe.gin"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Attributes:
    routing: "dense" or a name in `ROUTINGS` (gin/routing/<routing>.gin).
    num_experts: E (ignored for dense).
  """
  routing: str
  num_experts: int = 8

  def __post_init__(self):
    if self.routing != DENSE and self.routing not in ROUTINGS:
      raise ValueError(f"routing must be {DENSE!r} or one of {ROUTINGS}; got "
                       f"routing={self.routing!r}")
    if self.num_experts < 1:
      raise ValueError(f"num_experts must be >= 1; got num_experts="
                       f"{self.num_experts}")

  @property
  def name(self) -> str:
    if self.routing == DENSE:
      return DENSE
    return f"{self.routing}_e{self.num_experts}"

  def gin_files(self) -> list[str]:
    if self.routing == DENSE:
      return [_DENSE_FILE]
    return [_SPARSE_FILE, f"gin/routing/{self.routing}.gin"]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SparseSettings:
  """What every sparse model of a comparison shares, whatever its routing
  file sets (gin/routing/st_moe.gin alone raises the z-loss weight).

  Attributes:
    aux_loss_factor, router_z_loss_factor: routing loss weights.
    train_capacity_per_choice, eval_capacity_per_choice: expert slots per
      routing choice, as a multiple of S / E: a token-choice layer with k
      choices gets capacity factor k * this (T5X's convention counts one
      choice per token), so a top-2 model keeps as many slots per choice as
      a top-1 one. Expert choice layers keep the factor their routing file
      sets (the experts per token `moe_jax.flops` counts).
  """
  aux_loss_factor: float = 0.01
  router_z_loss_factor: float = 0.001
  train_capacity_per_choice: float = 1.25
  eval_capacity_per_choice: float = 2.0


def model_config(spec: ModelSpec, size_bindings: Sequence[str],
                 sparse: SparseSettings = SparseSettings()
                 ) -> tuple[TransformerConfig, LossConfig]:
  """The model and its routing loss weights, from the gin files, with a
  sparse model's shared settings bound from `sparse`.

  Clears and replaces the global gin config.
  """
  bindings = list(size_bindings)
  if spec.routing != DENSE:
    bindings.append(f"NUM_EXPERTS={spec.num_experts}")
    gin_utils.parse(spec.gin_files(), bindings)
    k = gin.query_parameter("NUM_SELECTED_EXPERTS/macro.value")
    bindings += [
        f"AUX_LOSS_FACTOR={sparse.aux_loss_factor}",
        f"ROUTER_Z_LOSS_FACTOR={sparse.router_z_loss_factor}",
        f"TRAIN_CAPACITY_FACTOR={k * sparse.train_capacity_per_choice}",
        f"EVAL_CAPACITY_FACTOR={k * sparse.eval_capacity_per_choice}"]
  gin_utils.parse(spec.gin_files(), bindings)
  config = configured_model_config()
  loss = LossConfig()  # Dense gin files leave it unconfigured.
  if spec.routing != DENSE:  # As gin/runs' LOSS_CONFIG builds it.
    loss = gin.get_configurable(LossConfig)()
  gin.clear_config()
  return config, loss


def _with_width(config: TransformerConfig, width: int) -> TransformerConfig:
  """`config` with experts, and extra dense FFNs where a stack has them,
  `width` wide."""
  def stack(moe: Optional[MoeConfig]) -> Optional[MoeConfig]:
    if moe is None:
      return None
    return dataclasses.replace(
        moe, layer=moe.layer.clone(expert_hidden_dim=width),
        extra_dense_ffn_dim=width if moe.extra_dense_ffn else None)
  return dataclasses.replace(config, encoder_moe=stack(config.encoder_moe),
                             decoder_moe=stack(config.decoder_moe))


def forward_flops(config: TransformerConfig,
                  lengths: Mapping[str, int]) -> float:
  """Forward FLOPs of one example of `lengths` ({"inputs", "targets"})."""
  return flops.count(config, lengths["inputs"],
                     lengths["targets"]).forward_flops


def flop_matched(config: TransformerConfig, dense: TransformerConfig,
                 lengths: Mapping[str, int]) -> TransformerConfig:
  """`config` with its expert width (and ST-MoE's extra dense FFN width, set
  equal) solved so that its forward FLOPs match `dense`'s; the dense FFNs
  keep the dense model's width. Dense configs are returned as is.

  Raises:
    ValueError: even one-wide experts cost more than the dense model.
  """
  if config.encoder_moe is None and config.decoder_moe is None:
    return config
  target = forward_flops(dense, lengths)
  cost = lambda w: forward_flops(_with_width(config, w), lengths)
  low, high = 8, 16  # FLOPs are linear in the width: two points solve it.
  width = round(low + (target - cost(low)) * (high - low) /
                (cost(high) - cost(low)))
  if width < 1:
    raise ValueError(f"cannot FLOP-match {config} to the dense model: it "
                     "costs more with one-wide experts")
  return _with_width(config, width)


# Settings a sparse variant may differ in, because they are the variant:
# its routing, and the widths FLOP matching solves. Capacity factors and
# the number of experts may differ too, but `check_matched` checks them
# against the shared per-choice slots and the spec.
_VARIANT_SETTINGS = (".router", ".expert_hidden_dim", ".extra_dense_ffn",
                     ".train_capacity_factor", ".eval_capacity_factor",
                     ".num_experts")


def _flat(value, path: str) -> dict[str, str]:
  """path -> repr of every leaf field of a (nested) dataclass; a dataclass
  leaf's class name under path + ".type"."""
  if not dataclasses.is_dataclass(value):
    return {path: repr(value)}
  out = {f"{path}.type": type(value).__name__}
  for field in dataclasses.fields(value):
    if field.name not in ("parent", "name"):  # flax module bookkeeping
      out.update(_flat(getattr(value, field.name), f"{path}.{field.name}"))
  return out


def _check_capacity(spec: ModelSpec, stack: str, moe: MoeConfig,
                    sparse: SparseSettings) -> None:
  layer = moe.layer
  k = getattr(layer.router, "num_selected_experts", None)
  if layer.num_experts != spec.num_experts:
    raise ValueError(f"{spec.name}: {stack}_moe has {layer.num_experts} "
                     f"experts, its spec {spec.num_experts}")
  if k is None:  # expert choice: moe_jax.flops counts the eval factor
    if layer.train_capacity_factor != layer.eval_capacity_factor:
      raise ValueError(
          f"{spec.name}: {stack}_moe trains at capacity factor "
          f"{layer.train_capacity_factor:g} but its FLOPs count "
          f"{layer.eval_capacity_factor:g} (eval_capacity_factor)")
    return
  for mode in ("train", "eval"):
    want = k * getattr(sparse, f"{mode}_capacity_per_choice")
    got = getattr(layer, f"{mode}_capacity_factor")
    if abs(got - want) > 1e-9:
      raise ValueError(
          f"{spec.name}: {stack}_moe {mode}_capacity_factor={got:g}, not k * "
          f"{mode}_capacity_per_choice = {want:g}")


def check_matched(models: Mapping[ModelSpec, tuple[TransformerConfig,
                                                   LossConfig]],
                  sparse: SparseSettings) -> None:
  """Raises ValueError, naming the setting and two models, unless the
  sparse models of `models` (spec -> (model, routing loss weights)) differ
  only in their routing, their FLOP-matched widths and their number of
  experts, with capacity factors of k * `sparse`'s slots per choice (token
  choice) or equal in training and evaluation (expert choice) and
  `sparse`'s routing loss weights."""
  reference = None
  for spec, (config, loss) in models.items():
    if spec.routing == DENSE:
      continue
    if (loss.aux_loss_factor, loss.router_z_loss_factor) != (
        sparse.aux_loss_factor, sparse.router_z_loss_factor):
      raise ValueError(f"{spec.name}: routing loss weights (aux_loss_factor"
                       f" / router_z_loss_factor) {loss.aux_loss_factor:g} / "
                       f"{loss.router_z_loss_factor:g}, not the shared "
                       f"{sparse.aux_loss_factor:g} / "
                       f"{sparse.router_z_loss_factor:g}")
    for stack in ("encoder", "decoder"):
      moe = getattr(config, f"{stack}_moe")
      if moe is not None:
        _check_capacity(spec, stack, moe, sparse)
    settings = {path: value for path, value in _flat(config, "model").items()
                if not any(part in path for part in _VARIANT_SETTINGS)}
    if reference is None:
      reference = spec, settings
      continue
    for path in sorted(settings.keys() | reference[1].keys()):
      if settings.get(path) != reference[1].get(path):
        raise ValueError(
            f"{spec.name} and {reference[0].name} differ in {path} "
            f"({settings.get(path)} vs {reference[1].get(path)}), which is "
            "not what their variants vary")


def _moe_cells(moe: MoeConfig, mlp_dim: int) -> list[str]:
  """Experts x width, k ("-" under expert choice), train / eval capacity
  factors and the extra dense FFN's width ("-": none) of one stack's
  `MoeConfig`."""
  layer = moe.layer
  return [f"{layer.num_experts} x {layer.expert_hidden_dim or mlp_dim}",
          str(getattr(layer.router, "num_selected_experts", "-")),
          f"{layer.train_capacity_factor:g} / {layer.eval_capacity_factor:g}",
          str(moe.extra_dense_ffn_dim or mlp_dim) if moe.extra_dense_ffn
          else "-"]


def settings_table(models: Mapping[ModelSpec, tuple[TransformerConfig,
                                                    LossConfig]],
                   lengths: Mapping[str, int]) -> list[str]:
  """Markdown lines: one row per model of `models` (spec -> (model, routing
  loss weights), as `experiments.jobs.resolve_models` gives them) with its
  parameters, active parameters per token, forward FLOPs of one example of
  `lengths` (and their ratio to the first row's: dense first, then by
  name), and the settings FLOP matching and the routing files chose; a
  setting where the encoder's and decoder's MoE layers differ reads "enc X;
  dec Y"."""
  lines = ["| model | params | active params / token | forward GFLOPs / "
           "example | vs first | FFN width | experts x width | k | "
           "capacity train / eval | extra dense FFN width | aux / z loss |",
           "|" + "---|" * 11]
  reference = None
  for spec in sorted(models, key=lambda m: (m.routing != DENSE, m.name)):
    config, loss = models[spec]
    counts = flops.count(config, lengths["inputs"], lengths["targets"])
    reference = reference or counts.forward_flops
    stacks = [_moe_cells(moe, config.mlp_dim)
              for moe in (config.encoder_moe, config.decoder_moe)
              if moe is not None]
    if not stacks:
      sparse = ["-"] * 5
    else:
      sparse = [c if len(set(column)) == 1 else
                f"enc {column[0]}; dec {column[-1]}"
                for c, column in zip(stacks[0], zip(*stacks))] + [
                    f"{loss.aux_loss_factor:g} / "
                    f"{loss.router_z_loss_factor:g}"]
    lines.append(
        f"| {spec.name} | {counts.total_params:,} | "
        f"{counts.active_params_per_token:,.0f} | "
        f"{counts.forward_flops / 1e9:.4f} | "
        f"{counts.forward_flops / reference:.3f} | {config.mlp_dim} | "
        + " | ".join(sparse) + " |")
  return lines
