"""The FLAN-MoE experiment driver (experiments/): its plan, FLOP matching,
and a micro run end to end (a few steps, one seed, dense vs Switch)."""

import collections
import dataclasses
import math

import gin
import numpy as np
import pytest
import seqio

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
      micro_config(tmp_path), seeds=(0, 1), flan_cot_rate=0,
      ablate_experts=(8,),
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
  with pytest.raises(ValueError, match="flan_cot_rate"):
    dataclasses.replace(config, flan_cot_rate=1.0)
  with pytest.raises(ValueError, match="tune_schedule"):
    dataclasses.replace(config, tune_schedule="linear")


def test_micro_run_fills_the_table(tmp_path):
  config = micro_config(tmp_path)
  rows = flan_moe.run_experiment(config)
  summary = report.write(config, rows,
                         baselines=jobs.constant_baselines(config))
  table = summary["main"]["classification"]
  assert list(table) == ["dense", "switch_top1_e4"]
  for model, columns in table.items():
    assert list(columns) == ["pre-train CE", *report.SETTINGS,
                             report.LEARNED, *report.GAINS]
    for column, values in columns.items():
      cot = column.startswith("IT+CoT")  # with the FLAN CoT files only
      assert len(values) == (plan.flan_cot_present() if cot else 1), (
          model, column)
      assert all(math.isfinite(v) for v in values), (model, column)
  for row in rows:
    stats = row["routing"]
    if row["model"] == "dense" or row["stage"] == "pretrain":
      assert stats is None
    else:  # the held-out cluster's routing, in eval mode
      assert 0 < stats["usage"] <= 1 and 0 <= stats["drop_ratio"] <= 1
      assert stats["load_cv"] >= 0
    for evaluation in row["evals"].values():
      scores = evaluation["tasks"]
      assert scores and not any(t.endswith("/average") for t in scores)
      assert min(scores.values()) <= evaluation["score"] <= max(
          scores.values())  # a mean over the tasks, not over an average
  for model, columns in summary["overall"].items():
    assert len(columns[report.LEARNED]) == 1, model  # one seed
  text = (tmp_path / "report" / "table.md").read_text()
  assert "| dense |" in text and "| switch_top1_e4 |" in text
  assert "## Mean over the held-out clusters" in text
  assert (tmp_path / "report" / "main.png").stat().st_size > 0
  # The batches are read once per data config: pre-training, fine-tuning
  # (before and after IT), instruction tuning (and with CoT), not per model.
  batch_files = list((tmp_path / "out" / "batches").glob("*.npz"))
  assert len(batch_files) == 3 + plan.flan_cot_present()
  # A second invocation reuses every job's result file.
  assert flan_moe.run_experiment(config) == rows


def test_held_out_clusters_leave_instruction_tuning_together():
  tune, instruct = jobs.held_out_mixtures(("rules", "location"))
  tune_tasks = {t.name for t in seqio.get_mixture_or_task(tune).tasks}
  instruct_tasks = {t.name for t in seqio.get_mixture_or_task(
      instruct).tasks}
  # Fine-tuning trains on what evaluation scores: the zero-shot variants.
  assert tune_tasks == {t.name for c in ("rules", "location")
                        for t in seqio.get_mixture_or_task(
                            f"mini_flan_eval_{c}").tasks}
  held_out = {t.name for c in ("rules", "location")
              for t in seqio.get_mixture_or_task(f"mini_flan_{c}").tasks}
  every = {t.name for t in seqio.get_mixture_or_task("mini_flan").tasks}
  assert instruct_tasks == every - held_out
  assert any(n.endswith("_fs") for n in held_out - instruct_tasks)
  # Each generated task is drawn equally often; its prompt variants (with
  # and without options) share its rate.
  mixture = seqio.get_mixture_or_task(jobs.held_out_mixtures(
      ("word_count", "location"))[0])
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == {
      "mini_flan_count_words_zs": 1.0,
      "mini_flan_location_entailment_zs": 0.5,
      "mini_flan_location_entailment_zs_noopt": 0.5}
  assert jobs.held_out_mixtures(("rules", "location")) == (tune, instruct)


def test_constant_baselines_score_the_evaluated_examples(tmp_path):
  config = dataclasses.replace(micro_config(tmp_path), held_out=("rules",),
                               eval_examples=16)
  scores = jobs.constant_baselines(config)["rules"]
  assert set(scores) == {"zero_shot", "few_shot"}
  # By hand: the mean over the cluster's tasks of the majority answer's
  # share of the first 16 validation examples.
  shares = []
  for task in seqio.get_mixture_or_task("mini_flan_eval_rules").tasks:
    rows = list(task.get_dataset(dict(config.instruct_lengths),
                                 split="validation", shuffle=False)
                .take(16).as_numpy_iterator())
    answers = collections.Counter(r["targets_pretokenized"] for r in rows)
    shares.append(100 * answers.most_common(1)[0][1] / len(rows))
  assert scores["zero_shot"] == pytest.approx(np.mean(shares))


def test_flan_cot_variant_instruction_tunes_on_the_real_files(tmp_path):
  if not plan.flan_cot_present():
    pytest.skip("no FLAN CoT files in the data directory "
                "($MOE_JAX_DATA_DIR/flan_cot)")
  config = dataclasses.replace(micro_config(tmp_path), routings=("dense",))
  phases = plan.plan(config)
  cot = [j for phase in phases for j in phase if j.stage == "instruct_cot"]
  assert [(j.model.name, j.seed) for j in cot] == [("dense", 0)]
  models = jobs.resolve_models(config, {cot[0].model})
  run = jobs.build_run(config, models, cot[0])
  mixture = seqio.get_mixture_or_task(run.data.mixture_or_task_name)

  def share(mixture):
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    from_files = sum(r for n, r in rates.items() if "flan_cot" in n)
    return from_files / sum(rates.values())

  assert share(mixture) == pytest.approx(config.flan_cot_rate)
  # Another rate is another mixture over the same CoT tasks.
  other = jobs.flan_cot_mixture(jobs.held_out_mixtures(config.held_out)[1],
                                0.5)
  assert other != mixture.name
  assert share(seqio.get_mixture_or_task(other)) == pytest.approx(0.5)
  # The CoT tasks read the files: a GSM8K question, over the byte vocabulary.
  gsm8k = seqio.get_mixture_or_task("mini_flan_flan_cot_gsm8k")
  example = next(gsm8k.get_dataset(dict(config.instruct_lengths),
                                   split="train", shuffle=False)
                 .as_numpy_iterator())
  assert isinstance(gsm8k.output_features["inputs"].vocabulary,
                    seqio.ByteVocabulary)
  assert len(example["targets_pretokenized"]) > 20  # rationale, then answer
  jobs.run_job(config, models, cot[0].init_from)
  rows = jobs.run_job(config, models, cot[0])
  assert [r["cluster"] for r in rows] == list(config.held_out)
  assert set(rows[0]["evals"]) == {"zero_shot", "few_shot"}


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
  # Beside the constant answer: its row, and FT minus it per seed.
  lines, values = report.main_table(rows, ["dense"], "c",
                                    {"zero_shot": 55.0, "few_shot": 40.0})
  assert values["dense"][report.LEARNED] == [-5, 15, 5]
  constant = lines[2].strip("| ").split(" | ")
  header = lines[0].strip("| ").split(" | ")
  assert constant[0] == "constant answer"
  assert constant[header.index("FT (no IT)")] == "55.0"
  assert constant[header.index("IT few-shot")] == "40.0"


def test_overall_table_averages_clusters_per_seed_then_seeds():
  def at(cluster, row):
    return {**row, "cluster": cluster}
  rows = [at("c", _row(0, "finetune", 50)), at("c", _row(1, "finetune", 70)),
          at("d", _row(0, "finetune", 30)), at("d", _row(1, "finetune", 20)),
          at("c", _row(0, "instruct_finetune", 60)),
          at("d", _row(0, "instruct_finetune", 40)),
          at("d", _row(1, "instruct_finetune", 10)),  # seed 1 lacks c
          at("c", _row(0, "untuned", 0)), at("d", _row(0, "untuned", 0)),
          at("c", _row(0, "instruct", 5)), at("d", _row(0, "instruct", 7))]
  baselines = {"c": {"zero_shot": 40.0}, "d": {"zero_shot": 10.0}}
  lines, values = report.overall_table(rows, ["dense"], ("c", "d"),
                                       baselines)
  columns = values["dense"]
  # seed 0: (50 - 40 + 30 - 10) / 2; seed 1: (70 - 40 + 20 - 10) / 2.
  assert columns[report.LEARNED] == [15, 20]
  assert columns["IT then FT - constant"] == [25]  # seed 0 only
  assert columns["IT gain on FT"] == [10]
  assert columns["IT gain zero-shot"] == [6]
  assert columns["IT gain few-shot"] == []
  mean, low, high = report.paired_interval([15, 20])
  assert lines[2].startswith(
      f"| dense | {mean:+.1f} [{low:+.1f}, {high:+.1f}] (n=2) |")


def test_versus_dense_pairs_each_sparse_model_with_dense_by_seed():
  def at(model, cluster, row):
    return {**row, "model": model, "cluster": cluster}
  rows = []
  # Per (model, seed): FT scores on clusters c and d, then IT zero-shot.
  scores = {("dense", 0): (50, 30, 4), ("dense", 1): (70, 20, 6),
            ("moe", 0): (40, 30, 10), ("moe", 1): (74, 20, 2),
            ("moe", 2): (90, 90, 90)}  # no dense seed 2: not paired
  for (model, seed), (c, d, it) in scores.items():
    rows += [at(model, "c", _row(seed, "finetune", c)),
             at(model, "d", _row(seed, "finetune", d)),
             at(model, "c", _row(seed, "instruct", it)),
             at(model, "d", _row(seed, "instruct", it))]
  baselines = {"c": {"zero_shot": 40.0, "few_shot": 30.0},
               "d": {"zero_shot": 10.0, "few_shot": 5.0}}
  lines, values = report.versus_dense_table(rows, ["dense", "moe"],
                                            ("c", "d"), baselines)
  assert list(values) == ["moe"]
  # seed 0: (40 + 30) / 2 - (50 + 30) / 2; seed 1: (74 + 20) / 2 - 45.
  assert values["moe"]["FT (no IT)"] == [-5, 2]
  assert values["moe"]["IT zero-shot"] == [6, -4]
  assert values["moe"]["IT gain on FT"] == []  # no IT then FT rows
  mean, low, high = report.paired_interval([-5, 2])
  assert lines[2].startswith(
      f"| moe | {mean:+.1f} [{low:+.1f}, {high:+.1f}] (n=2) |")
  assert report.versus_dense_table(rows, ["moe"], ("c", "d"),
                                   baselines) == ([], {})


def test_routing_table_compares_before_and_after_instruction_tuning():
  def row(seed, stage, cluster, usage):
    return {"model": "st_moe_e4", "ablation": "", "seed": seed,
            "stage": stage, "cluster": cluster,
            "routing": {"usage": usage, "drop_ratio": usage / 10,
                        "load_cv": usage}}
  rows = [row(s, stage, c, u) for s in (0, 1) for c, u in (("a", 0.2),
                                                           ("b", 0.4))
          for stage in ("untuned", "instruct")]
  rows.append(row(0, "instruct", "other", 0.9))  # not a held-out cluster
  rows[1]["routing"] = {"usage": 0.6, "drop_ratio": 0.06, "load_cv": 0.6}
  lines, values = report.routing_table(rows, ["dense", "st_moe_e4"],
                                       ("a", "b"))
  columns = values["st_moe_e4"]
  assert list(values) == ["st_moe_e4"]  # dense has no routing
  assert columns["usage before IT"] == pytest.approx([30, 30])
  assert columns["usage after IT"] == pytest.approx([50, 30])
  assert columns["drop_ratio after IT"] == pytest.approx([5, 3])
  assert columns["load_cv after IT"] == pytest.approx([0.5, 0.3])
  assert lines[2].startswith("| st_moe_e4 | 30.0 ± 0.0 (n=2)")
