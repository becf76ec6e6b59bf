"""The models an experiment compares: a dense T5 and FLOP-matched sparse T5s.

A `ModelSpec` names a routing strategy (a gin/routing/*.gin file, or "dense")
and a number of experts; `model_config` parses the repository's gin files for
it, so the experiment trains exactly the models `python -m moe_jax.main`
would.

FLOP matching (`flop_matched`): sparse models are made to cost the dense
model's forward FLOPs per example (moe_jax.flops: a token pays for the k
experts it is routed to, or capacity_factor experts under expert choice).
The expert width is solved first; where even one-wide experts cost more than
the dense model (ST-MoE's extra dense FFN after each MoE FFN), the model's
FFN width is solved instead, with experts as wide as the dense FFNs.
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


def model_config(spec: ModelSpec, size_bindings: Sequence[str]
                 ) -> tuple[TransformerConfig, LossConfig]:
  """The model and its routing loss weights, from the gin files.

  Clears and replaces the global gin config.
  """
  bindings = list(size_bindings)
  if spec.routing != DENSE:
    bindings.append(f"NUM_EXPERTS={spec.num_experts}")
  gin_utils.parse(spec.gin_files(), bindings)
  config = configured_model_config()
  loss = LossConfig()  # Dense gin files leave it unconfigured.
  if spec.routing != DENSE:  # As gin/runs' LOSS_CONFIG builds it.
    loss = gin.get_configurable(LossConfig)()
  gin.clear_config()
  return config, loss


def _with_widths(config: TransformerConfig, expert_width: Optional[int],
                 mlp_dim: Optional[int] = None) -> TransformerConfig:
  return dataclasses.replace(
      config.with_moe_layers(expert_hidden_dim=expert_width),
      mlp_dim=mlp_dim or config.mlp_dim)


def forward_flops(config: TransformerConfig,
                  lengths: Mapping[str, int]) -> float:
  """Forward FLOPs of one example of `lengths` ({"inputs", "targets"})."""
  return flops.count(config, lengths["inputs"],
                     lengths["targets"]).forward_flops


def _solve(cost, low: int, high: int, target: float) -> int:
  """The integer width w for which the linear `cost(w)` is nearest target."""
  a, b = cost(low), cost(high)
  return round(low + (target - a) * (high - low) / (b - a))


def flop_matched(config: TransformerConfig, dense: TransformerConfig,
                 lengths: Mapping[str, int]) -> TransformerConfig:
  """`config` with its FFN widths set so that its forward FLOPs match
  `dense`'s (see the module docstring); dense configs are returned as is."""
  if config.encoder_moe is None and config.decoder_moe is None:
    return config
  target = forward_flops(dense, lengths)
  width = _solve(lambda w: forward_flops(_with_widths(config, w), lengths),
                 8, 16, target)
  if width >= 1:
    return _with_widths(config, width)
  mlp = _solve(lambda w: forward_flops(_with_widths(config, None, w),
                                       lengths), 8, 16, target)
  if mlp < 1:
    raise ValueError(f"cannot FLOP-match {config} to the dense model")
  return _with_widths(config, None, mlp)


def _moe_cells(moe: MoeConfig, mlp_dim: int) -> list[str]:
  """Experts x width, k ("-" under expert choice), train / eval capacity
  factors and the extra dense FFN of one stack's `MoeConfig`."""
  layer = moe.layer
  return [f"{layer.num_experts} x {layer.expert_hidden_dim or mlp_dim}",
          str(getattr(layer.router, "num_selected_experts", "-")),
          f"{layer.train_capacity_factor:g} / {layer.eval_capacity_factor:g}",
          "yes" if moe.extra_dense_ffn else "no"]


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
           "capacity train / eval | extra dense FFN | aux / z loss |",
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
