"""The FLAN-MoE experiment driver (experiments/): its plan, FLOP matching,
and a micro run end to end (a few steps, one seed, dense vs Switch)."""

import dataclasses
import math

import gin
import pytest

from experiments import flan_moe, jobs, plan, report, variants
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


def _matched_models(routings, sparse=variants.SparseSettings()) -> dict:
  dense, dense_loss = variants.model_config(variants.ModelSpec("dense"), SIZE)
  models = {variants.ModelSpec("dense"): (dense, dense_loss)}
  for routing in routings:
    spec = variants.ModelSpec(routing, 4)
    sparse_config, loss = variants.model_config(spec, SIZE, sparse)
    models[spec] = (variants.flop_matched(sparse_config, dense, LENGTHS),
                    loss)
  return models


def test_settings_table_shows_each_models_cost_and_knobs():
  models = _matched_models(("st_moe", "switch_top1", "expert_choice"))
  dense = models[variants.ModelSpec("dense")][0]
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
    assert row[5] == str(dense.mlp_dim)  # every model keeps the dense FFNs
  assert cells["dense"][6:] == ["-"] * 5
  # ST-MoE pays for its extra dense FFN with narrower experts, as wide as it.
  st_moe = cells["st_moe_e4"]
  experts, width = st_moe[6].split(" x ")
  assert experts == "4" and st_moe[9] == width
  assert int(width) < int(cells["switch_top1_e4"][6].split(" x ")[1])
  # Shared loss weights; capacity 1.25 / 2 slots per routing choice.
  assert {row[10] for name, row in cells.items() if name != "dense"} == {
      "0.01 / 0.001"}
  assert st_moe[7] == "2" and st_moe[8] == "2.5 / 4"
  assert cells["switch_top1_e4"][8] == "1.25 / 2"
  # Expert choice routes the encoder at the factor its FLOPs count; the
  # causal decoder keeps top-2.
  assert cells["expert_choice_e4"][7] == "enc -; dec 2"
  assert cells["expert_choice_e4"][8] == "enc 2 / 2; dec 2.5 / 4"


def test_every_setting_gin_file_compares_matched_models(tmp_path):
  for setting in ("micro", "reduced", "full"):
    gin_utils.parse([f"experiments/gin/{setting}.gin"],
                    [f"OUT_DIR='{tmp_path}'"])
    config = ExperimentConfig()
    gin.clear_config()
    specs = {j.model for phase in plan.plan(config) for j in phase}
    models = jobs.resolve_models(config, specs)  # runs check_matched
    assert len(models) == len(specs)


def _replace_layer(models, routing, **knobs) -> dict:
  spec = variants.ModelSpec(routing, 4)
  config, loss = models[spec]
  return {**models, spec: (config.with_moe_layers(**knobs), loss)}


def test_check_matched_names_an_unintended_difference():
  sparse = variants.SparseSettings()
  models = _matched_models(variants.ROUTINGS)
  variants.check_matched(models, sparse)
  st_moe = variants.ModelSpec("st_moe", 4)
  config, loss = models[st_moe]
  confounds = {
      "router_z_loss_factor": {**models, st_moe: (config, dataclasses.replace(
          loss, router_z_loss_factor=0.0001))},
      "mlp_dim": {**models, st_moe: (dataclasses.replace(config, mlp_dim=16),
                                     loss)},
      "min_expert_capacity": _replace_layer(models, "switch_top1",
                                            min_expert_capacity=4),
      "train_capacity_factor=1.25": _replace_layer(
          models, "gshard_top2", train_capacity_factor=1.25),
      "trains at capacity factor": _replace_layer(
          models, "expert_choice", train_capacity_factor=1.25),
      "experts": _replace_layer(models, "switch_top1", num_experts=8),
  }
  for message, confounded in confounds.items():
    with pytest.raises(ValueError, match=message):
      variants.check_matched(confounded, sparse)


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
  assert len(main) == 2 * 2 * 5  # models x seeds x stages (untuned incl.)
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
    assert list(columns) == ["pre-train CE", *report.SETTINGS, *report.GAINS]
    for column, values in columns.items():
      assert len(values) == 1, (model, column)
      assert all(math.isfinite(v) for v in values), (model, column)
  for row in rows:
    for evaluation in row["evals"].values():
      scores = evaluation["tasks"]
      assert scores and not any(t.endswith("/average") for t in scores)
      assert min(scores.values()) <= evaluation["score"] <= max(
          scores.values())  # a mean over the tasks, not over an average
  text = (tmp_path / "report" / "table.md").read_text()
  assert "| dense |" in text and "| switch_top1_e4 |" in text
  assert (tmp_path / "report" / "main.png").stat().st_size > 0
  # A second invocation reuses every job's result file.
  assert flan_moe.run_experiment(config) == rows


def _row(seed, stage, zero_shot, few_shot=None) -> dict:
  evals = {"zero_shot": {"score": zero_shot}}
  if few_shot is not None:
    evals["few_shot"] = {"score": few_shot}
  return {"model": "dense", "ablation": "", "cluster": "c", "seed": seed,
          "stage": stage, "evals": evals, "train_loss": None}


def test_gains_are_paired_by_seed_with_t_intervals():
  # Student t, 2 degrees of freedom: 97.5% quantile 4.303.
  mean, low, high = report.paired_interval([1.0, 2.0, 3.0])
  assert mean == 2.0 and high - mean == pytest.approx(4.303 / 3 ** 0.5,
                                                      abs=1e-3)
  assert mean - low == pytest.approx(high - mean)
  rows = [_row(0, "finetune", 50), _row(1, "finetune", 70),
          _row(2, "finetune", 60), _row(0, "instruct_finetune", 52),
          _row(1, "instruct_finetune", 73), _row(2, "instruct_finetune", 61),
          _row(0, "untuned", 10, 12), _row(1, "untuned", 20, 30),
          _row(0, "instruct", 15, 22), _row(1, "instruct", 35, 31)]
  lines, values = report.main_table(rows, ["dense"], "c")
  gains = values["dense"]
  assert gains["IT gain on FT"] == [2, 3, 1]
  assert gains["IT gain zero-shot"] == [5, 15]
  assert gains["IT gain few-shot"] == [10, 1]
  # The cell is the interval, not the spread of either column.
  mean, low, high = report.paired_interval([2, 3, 1])
  assert f"{mean:+.1f} [{low:+.1f}, {high:+.1f}] (n=3)" in lines[-1]
