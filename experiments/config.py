"""The knobs of the FLAN-MoE experiment (`flan_moe.py`), bound in gin
(experiments/gin/*.gin)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Optional, Sequence

import gin

from experiments.variants import ModelSpec, SparseSettings
from moe_jax import knobs
from moe_jax.train.optimizers import Schedule

PRETRAIN_TASK = "mini_flan_span_corruption"
# Routing-loss ablation: (aux_loss_factor, router_z_loss_factor).
AUX_LOSSES = {"load_balancing": (0.01, 0.0), "router_z": (0.0, 0.001),
              "both": (0.01, 0.001), "none": (0.0, 0.0)}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Attributes:
    out_dir: checkpoints and per-job results.
    report_dir: where the table and plots go (None: OUT_DIR/report).
    routings: models of the main table ("dense" and `variants.ROUTINGS`).
    num_experts: E of the main table's sparse models.
    seeds: seeds of the main table (parameter init and data order).
    held_out: mini_flan clusters held out of instruction tuning.
    size_bindings: gin bindings of the model size (gin/models macros).
    sparse: what every sparse model shares (routing loss weights, expert
      slots per routing choice); bind `variants.SparseSettings.*`.
    pretrain_lengths, instruct_lengths: training feature lengths, tokens.
    few_shot_input_length: encoder length of the few-shot evaluation.
    batch_size: training examples (packed rows) per step.
    pretrain_steps, instruct_steps, finetune_steps: updates per stage.
    pretrain_learning_rate: peak of the pre-training rsqrt schedule.
    tune_learning_rate: peak rate of instruction tuning and fine-tuning.
    tune_schedule: their `moe_jax.train.optimizers.Schedule` after warmup
      ("cosine": decays to 0 at the stage's last step).
    warmup_steps: linear warmup of every stage.
    eval_examples: evaluation examples per task.
    flan_cot_rate: share of instruction-tuning examples drawn from the FLAN
      2022 chain-of-thought files in the variant `instruct_cot` (one job per
      model, seed `ablation_seed`); it runs when the data directory
      (`tasks.data_dir`: $MOE_JAX_DATA_DIR) holds them, and 0 turns it off.
    ablation_seed: the seed of every ablation.
    ablation_base: routing of the model the ablations vary.
    ablate_experts: E values (besides `num_experts`) for the base routing.
    ablate_routings: routings trained only for the ablation.
    ablate_aux_losses: keys of `AUX_LOSSES` used during instruction tuning.
    ablate_freeze: "router" and / or "experts" frozen during instruction
      tuning.
    ablate_eval_capacity: eval capacity factors of the instruction-tuned
      base model.
    workers: worker processes, one pool for every phase (1: in this
      process).
    compilation_cache_dir: JAX's persistent compilation cache (None: off).
    xla_flags: added to XLA_FLAGS in every process (tiny CPU models gain
      from `--xla_backend_optimization_level=0`: compiling costs more than
      the optimized code saves).
  """
  out_dir: str = gin.REQUIRED
  report_dir: Optional[str] = None
  routings: Sequence[str] = ("dense", "switch_top1", "st_moe")
  num_experts: int = 8
  seeds: Sequence[int] = (0, 1, 2)
  held_out: Sequence[str] = ("classification",)
  size_bindings: Sequence[str] = ()
  sparse: SparseSettings = dataclasses.field(default_factory=SparseSettings)
  pretrain_lengths: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {"inputs": 64, "targets": 16})
  instruct_lengths: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {"inputs": 128, "targets": 16})
  few_shot_input_length: int = 256
  batch_size: int = 16
  pretrain_steps: int = 200
  instruct_steps: int = 150
  finetune_steps: int = 100
  pretrain_learning_rate: float = 0.01
  tune_learning_rate: float = 0.003
  tune_schedule: str = "cosine"
  warmup_steps: int = 10
  eval_examples: int = 32
  flan_cot_rate: float = 0.2
  ablation_seed: int = 0
  ablation_base: str = "switch_top1"
  ablate_experts: Sequence[int] = ()
  ablate_routings: Sequence[str] = ()
  ablate_aux_losses: Sequence[str] = ()
  ablate_freeze: Sequence[str] = ()
  ablate_eval_capacity: Sequence[float] = ()
  workers: int = 1
  compilation_cache_dir: Optional[str] = None
  xla_flags: str = ""

  def __post_init__(self):
    for routing in (*self.routings, *self.ablate_routings, self.ablation_base):
      ModelSpec(routing, self.num_experts)
    for knob in ("pretrain_steps", "instruct_steps", "finetune_steps",
                 "batch_size", "workers", "eval_examples"):
      if getattr(self, knob) < 1:
        raise ValueError(f"{knob} must be >= 1; got {knob}="
                         f"{getattr(self, knob)}")
    knobs.choice(Schedule, "tune_schedule", self.tune_schedule)
    if not 0 <= self.flan_cot_rate < 1:
      raise ValueError("flan_cot_rate must be in [0, 1); got "
                       f"flan_cot_rate={self.flan_cot_rate}")
    if not self.seeds:
      raise ValueError("seeds must name at least one seed")
    unknown = set(self.ablate_aux_losses) - set(AUX_LOSSES)
    if unknown:
      raise ValueError(f"ablate_aux_losses must be keys of {list(AUX_LOSSES)}"
                       f"; got {sorted(unknown)}")
    if set(self.ablate_freeze) - {"router", "experts"}:
      raise ValueError("ablate_freeze takes 'router' and 'experts'; got "
                       f"{list(self.ablate_freeze)}")

  @property
  def reports_to(self) -> Path:
    return Path(self.report_dir or Path(self.out_dir) / "report")
