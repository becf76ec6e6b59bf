"""The jobs of the FLAN-MoE experiment and their order (see `flan_moe.py`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from experiments.config import ExperimentConfig
from experiments.variants import ModelSpec


@dataclasses.dataclass(frozen=True)
class Job:
  """One training stage (or evaluation only) of one model and seed.

  Every stage after pre-training is scored on each held-out cluster
  (`ExperimentConfig.held_out`): instruction tuning holds all of them out at
  once, fine-tuning trains on all of them together.

  Attributes:
    model: the model's spec.
    seed: its seed.
    stage: pretrain, untuned (the pre-trained model, evaluated only),
      finetune, instruct, instruct_finetune, or instruct_cot (instruction
      tuning with FLAN chain-of-thought data mixed in).
    ablation: "" in the main grid, else "<knob>=<value>".
    init_from: the job whose checkpoint this one starts from (None: fresh).
    train: whether this job trains (False: evaluate `init_from` only).
    aux_loss: a key of `AUX_LOSSES` (None: the model's own weights).
    freeze: moe_jax.train.optimizers.Freeze value.
    eval_capacity_factor: None: the model's.
  """
  model: ModelSpec
  seed: int
  stage: str
  ablation: str = ""
  init_from: Optional["Job"] = None
  train: bool = True
  aux_loss: Optional[str] = None
  freeze: str = "none"
  eval_capacity_factor: Optional[float] = None

  @property
  def name(self) -> str:
    parts = [self.model.name, f"seed{self.seed}", self.stage,
             self.ablation.replace("=", "_")]
    return "-".join(p for p in parts if p)


def flan_cot_present() -> bool:
  """Whether the data directory (`tasks.data_dir`) holds every FLAN 2022
  chain-of-thought file."""
  from moe_jax import paths
  from tasks import data_dir, flan2022_sources
  root = paths.as_path(data_dir.data_dir())
  return all((root / flan2022_sources.cot_file(name)).exists()
             for name in flan2022_sources.COT_DATASETS)


def plan(config: ExperimentConfig) -> list[list[Job]]:
  """The jobs, in phases; a job depends only on jobs of earlier phases."""
  pretrain, tune, after = [], [], []

  def chain(model: ModelSpec, seed: int, ablation: str = "",
            full: bool = True) -> Job:
    base = Job(model, seed, "pretrain", ablation=ablation)
    pretrain.append(base)
    if full:
      tune.append(Job(model, seed, "untuned", ablation, base, train=False))
    tune.append(Job(model, seed, "finetune", ablation, base))
    instruct = Job(model, seed, "instruct", ablation, base)
    tune.append(instruct)
    if full:
      after.append(Job(model, seed, "instruct_finetune", ablation, instruct))
    return base

  for seed in config.seeds:
    for routing in config.routings:
      chain(ModelSpec(routing, config.num_experts), seed)
  if config.flan_cot_rate and flan_cot_present():
    tune.extend(Job(j.model, j.seed, "instruct_cot", init_from=j)
                for j in pretrain if j.seed == config.ablation_seed)
  seed = config.ablation_seed
  base_model = ModelSpec(config.ablation_base, config.num_experts)
  base = (next(j for j in pretrain if j.model == base_model and j.seed == seed)
          if base_model.routing in config.routings and seed in config.seeds
          else None)
  wants_base = (config.ablate_aux_losses or config.ablate_freeze or
                config.ablate_eval_capacity)
  if base is None and wants_base:
    base = chain(base_model, seed, "base", full=False)
  for experts in config.ablate_experts:
    chain(ModelSpec(config.ablation_base, experts), seed,
          f"experts={experts}", full=False)
  for routing in config.ablate_routings:
    chain(ModelSpec(routing, config.num_experts), seed, f"routing={routing}",
          full=False)
  if base is not None:
    for loss in config.ablate_aux_losses:
      tune.append(Job(base_model, seed, "instruct", f"aux={loss}", base,
                      aux_loss=loss))
    for part in config.ablate_freeze:
      tune.append(Job(base_model, seed, "instruct", f"freeze={part}", base,
                      freeze=part))
    instruct = next(j for j in tune if j.model == base_model and
                    j.seed == seed and j.stage == "instruct" and
                    j.init_from == base and j.aux_loss is None and
                    j.freeze == "none")
    for factor in config.ablate_eval_capacity:
      after.append(Job(base_model, seed, "instruct",
                       f"eval_capacity={factor:g}", instruct, train=False,
                       eval_capacity_factor=factor))
  return [phase for phase in (pretrain, tune, after) if phase]
