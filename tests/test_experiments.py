"""The FLAN-MoE experiment driver (experiments/): its plan, FLOP matching,
and a micro run end to end (a few steps, one seed, dense vs Switch)."""

import dataclasses
import math

import gin
import pytest

from experiments import flan_moe, plan, report, variants
from experiments.config import ExperimentConfig
from moe_jax import flops, gin_utils

SIZE = ("EMBED_DIM=16", "MLP_DIM=32", "NUM_HEADS=2", "HEAD_DIM=8",
        "VOCAB_SIZE=259", "MIN_EXPERT_CAPACITY=1")
LENGTHS = {"inputs": 32, "targets": 8}


def micro_config(tmp_path) -> ExperimentConfig:
  gin_utils.parse(["experiments/gin/micro.gin"],
                  [f"OUT_DIR='{tmp_path / 'out'}'",
                   f"REPORT_DIR='{tmp_path / 'report'}'",
                   f"ExperimentConfig.compilation_cache_dir="
                   f"'{tmp_path / 'cache'}'"])
  config = ExperimentConfig()
  gin.clear_config()
  return config


@pytest.mark.parametrize("routing", variants.ROUTINGS)
def test_sparse_models_cost_the_dense_flops(routing):
  dense, _ = variants.model_config(variants.ModelSpec("dense"), SIZE)
  sparse, _ = variants.model_config(variants.ModelSpec(routing, 4), SIZE)
  matched = variants.flop_matched(sparse, dense, LENGTHS)
  ratio = (variants.forward_flops(matched, LENGTHS) /
           variants.forward_flops(dense, LENGTHS))
  assert abs(ratio - 1) < 0.03


def test_settings_table_shows_each_models_cost_and_knobs():
  dense, dense_loss = variants.model_config(variants.ModelSpec("dense"), SIZE)
  models = {variants.ModelSpec("dense"): (dense, dense_loss)}
  for routing in ("st_moe", "switch_top1", "expert_choice"):
    spec = variants.ModelSpec(routing, 4)
    sparse, loss = variants.model_config(spec, SIZE)
    models[spec] = (variants.flop_matched(sparse, dense, LENGTHS), loss)
  header, rule, *rows = variants.settings_table(models, LENGTHS)
  assert header.count("|") == rule.count("|") == rows[0].count("|") == 12
  cells = {r.split(" | ")[0][2:]: r.strip("| ").split(" | ") for r in rows}
  assert list(cells) == ["dense", "expert_choice_e4", "st_moe_e4",
                         "switch_top1_e4"]
  for spec, (config, loss) in models.items():
    row = cells[spec.name]
    counts = flops.count(config, LENGTHS["inputs"], LENGTHS["targets"])
    assert row[1] == f"{counts.total_params:,}"
    assert abs(float(row[4]) - 1) < 0.03  # FLOP-matched to dense
    assert row[5] == str(config.mlp_dim)
  assert cells["dense"][6:] == ["-"] * 5
  # ST-MoE: its extra dense FFN is paid for by narrower dense FFNs.
  st_moe = cells["st_moe_e4"]
  assert int(st_moe[5]) < dense.mlp_dim and st_moe[9] == "yes"
  assert st_moe[10] == "0.01 / 0.001" and st_moe[7] == "2"
  assert cells["switch_top1_e4"][5] == str(dense.mlp_dim)
  # Expert choice routes the encoder; the causal decoder keeps top-2.
  assert cells["expert_choice_e4"][7] == "enc -; dec 2"


def test_plan_orders_jobs_after_their_checkpoints(tmp_path):
  config = dataclasses.replace(
      micro_config(tmp_path), seeds=(0, 1), ablate_experts=(8,),
      ablate_routings=("expert_choice",), ablate_aux_losses=("router_z",),
      ablate_freeze=("router", "experts"), ablate_eval_capacity=(1.0,))
  phases = plan.plan(config)
  seen = set()
  for phase in phases:
    for job in phase:
      assert job.init_from is None or job.init_from.name in seen
    seen |= {job.name for job in phase}
  jobs = [job for phase in phases for job in phase]
  assert len(seen) == len(jobs)  # names are unique: result files differ
  main = [j for j in jobs if not j.ablation]
  assert len(main) == 2 * 2 * 4  # models x seeds x stages
  ablations = {j.ablation for j in jobs if j.ablation}
  assert ablations == {"experts=8", "routing=expert_choice", "aux=router_z",
                       "freeze=router", "freeze=experts", "eval_capacity=1"}


def test_bad_knobs_fail_at_start(tmp_path):
  config = micro_config(tmp_path)
  with pytest.raises(ValueError, match="routing"):
    dataclasses.replace(config, routings=("dense", "top3"))
  with pytest.raises(ValueError, match="ablate_aux_losses"):
    dataclasses.replace(config, ablate_aux_losses=("l2",))


def test_micro_run_fills_the_table(tmp_path):
  config = micro_config(tmp_path)
  rows = flan_moe.run_experiment(config)
  summary = report.write(config, rows)
  table = summary["main"]["classification"]
  assert list(table) == ["dense", "switch_top1_e4"]
  for model, columns in table.items():
    assert list(columns) == ["pre-train CE", *report.SETTINGS, report.GAIN]
    for column, values in columns.items():
      assert len(values) == 1, (model, column)
      assert all(math.isfinite(v) for v in values), (model, column)
  text = (tmp_path / "report" / "table.md").read_text()
  assert "| dense |" in text and "| switch_top1_e4 |" in text
  assert (tmp_path / "report" / "main.png").stat().st_size > 0
  # A second invocation reuses every job's result file.
  assert flan_moe.run_experiment(config) == rows
