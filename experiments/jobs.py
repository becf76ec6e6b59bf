"""Running one `plan.Job`: build its `moe_jax.train.run.Run`, train,
evaluate on every held-out cluster, and write its result rows
(OUT_DIR/results/<job name>.json, a list).

A job has one result row per held-out cluster (pre-training: one row, cluster
""). A row holds the job's fields, the model's size and forward FLOPs per
example, the final training cross entropy (mean of the last 10% of steps),
per evaluation ("zero_shot", "few_shot") the mean exact match (percent)
over the cluster's tasks and each task's score, and for sparse models
evaluated zero-shot the routing on the cluster's validation examples
(`routing`: expert usage, drop ratio and load CV, means over sparse layers,
`moe_jax.inspection.analyses`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
import seqio

import tasks  # noqa: F401  (registers mini_flan)
from tasks import flan2022, flan2022_sources, mini_flan
from experiments import variants
from experiments.config import AUX_LOSSES, PRETRAIN_TASK, ExperimentConfig
from experiments.plan import Job
from experiments.variants import ModelSpec
from moe_jax import flops
from moe_jax.inspection import analyses, task_batches
from moe_jax.inspection.checkpoint import Checkpoint
from moe_jax.inspection.routing_report import route_batch
from moe_jax.models import build_model
from moe_jax.train import baseline, checkpoints, eval_averages, routing_monitor
from moe_jax.train import data
from moe_jax.train import run as run_lib
from moe_jax.train.data import DataConfig
from moe_jax.train.evaluation import EvalConfig, Evaluator
from moe_jax.train.metrics_log import METRICS_FILE
from moe_jax.train.objective import LossConfig
from moe_jax.train.optimizers import OptimizerConfig

Models = Mapping[ModelSpec, tuple]  # spec -> (TransformerConfig, LossConfig)
EVAL_BATCH = 32


def init_worker(config: ExperimentConfig) -> None:
  """Per process, before JAX compiles anything: XLA flags and JAX's
  persistent compilation cache."""
  if config.xla_flags:
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), config.xla_flags]).strip()
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir",
                      config.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def resolve_models(config: ExperimentConfig, specs: Iterable[ModelSpec]
                   ) -> dict:
  """spec -> (model config FLOP-matched to the dense model, loss config),
  checked by `variants.check_matched`."""
  dense, _ = variants.model_config(ModelSpec(variants.DENSE),
                                   config.size_bindings)
  out = {}
  for spec in specs:
    model, loss = variants.model_config(spec, config.size_bindings,
                                        config.sparse)
    out[spec] = (variants.flop_matched(model, dense, config.instruct_lengths),
                 loss)
  variants.check_matched(out, config.sparse)
  return out


def _model_dir(config: ExperimentConfig, job: Job) -> Path:
  return Path(config.out_dir) / "runs" / job.name


def _with_eval_capacity(model, factor: Optional[float]):
  if factor is None:
    return model
  return model.with_moe_layers(eval_capacity_factor=factor)


def held_out_mixtures(clusters: Sequence[str]) -> tuple[str, str]:
  """(fine-tuning mixture: the zero-shot tasks of `clusters`, the ones
  evaluation scores, each generated task drawn equally often whatever its
  number of prompt variants (with and without options share its rate);
  instruction-tuning mixture: every mini_flan task outside `clusters`),
  registered on first use from the per-cluster mixtures `tasks.mini_flan`
  registers."""
  suffix = "_".join(clusters)
  names = (f"mini_flan_tune_{suffix}", f"mini_flan_train_without_{suffix}")
  scored = [t.name for c in clusters
            for t in seqio.get_mixture_or_task(f"mini_flan_eval_{c}").tasks]
  variants = collections.Counter(_task_of(name) for name in scored)
  tune = [(name, 1 / variants[_task_of(name)]) for name in scored]
  held_out = {t.name for c in clusters
              for t in seqio.get_mixture_or_task(f"mini_flan_{c}").tasks}
  instruct = [(t.name, 1.0) for t in seqio.get_mixture_or_task(
      "mini_flan").tasks if t.name not in held_out]
  for name, members in zip(names, (tune, instruct)):
    if name not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(name, members)
  return names


def _task_of(zero_shot_task: str) -> str:
  """The generated task a zero-shot variant's name comes from
  (`mini_flan.instruction_task_names`)."""
  return zero_shot_task.removesuffix("_noopt")


def flan_cot_mixture(instruct: str, rate: float) -> str:
  """`instruct` with `rate` of its examples drawn from the FLAN 2022
  chain-of-thought files of the data directory (`tasks.data_dir`;
  zero-shot, with options), registered on first use. The CoT tasks are
  re-registered over mini_flan's byte vocabulary (a mixture holds one
  vocabulary); their targets are the rationale, then the answer."""
  name = f"{instruct}_flan_cot_{rate:g}"
  if name in seqio.MixtureRegistry.names():
    return name
  cot_only = "mini_flan_flan_cot"
  if cot_only not in seqio.MixtureRegistry.names():
    features = mini_flan.output_features()
    cot = []
    for dataset in flan2022_sources.COT_DATASETS:
      task = seqio.get_mixture_or_task(
          flan2022.task_name("cot", dataset, "zs_opt"))
      cot.append(f"{cot_only}_{dataset}")
      seqio.TaskRegistry.add(cot[-1], source=task.source,
                             preprocessors=task.preprocessors,
                             output_features=features)
    seqio.MixtureRegistry.add(cot_only, cot, default_rate=1.0)
  seqio.MixtureRegistry.add(name, [(instruct, 1 - rate), (cot_only, rate)])
  return name


def build_run(config: ExperimentConfig, models: Models, job: Job):
  """The `Run` of a training job."""
  model, loss = models[job.model]
  if job.aux_loss is not None:
    aux, z = AUX_LOSSES[job.aux_loss]
    loss = LossConfig(aux_loss_factor=aux, router_z_loss_factor=z)
  if job.stage == "pretrain":
    mixture, lengths = PRETRAIN_TASK, config.pretrain_lengths
    steps = config.pretrain_steps
    optimizer = OptimizerConfig(
        learning_rate=config.pretrain_learning_rate,
        warmup_steps=config.warmup_steps, total_steps=steps)
  else:
    lengths = config.instruct_lengths
    finetune, instruct = held_out_mixtures(config.held_out)
    if job.stage == "instruct":
      mixture, steps = instruct, config.instruct_steps
    elif job.stage == "instruct_cot":
      mixture = flan_cot_mixture(instruct, config.flan_cot_rate)
      steps = config.instruct_steps
    else:
      mixture, steps = finetune, config.finetune_steps
    optimizer = OptimizerConfig(
        learning_rate=config.tune_learning_rate,
        schedule=config.tune_schedule, warmup_steps=config.warmup_steps,
        total_steps=steps, freeze=job.freeze)
  init = (str(_model_dir(config, job.init_from))
          if job.init_from is not None else None)
  return run_lib.Run(
      model=model,
      train=run_lib.TrainConfig(
          model_dir=str(_model_dir(config, job)), num_steps=steps,
          save_every=steps, keep_checkpoints=1, log_every=max(steps // 2, 1),
          seed=job.seed, init_checkpoint=init, async_checkpointing=False,
          tensorboard=False),
      data=DataConfig(mixture, dict(lengths), batch_size=config.batch_size,
                      seed=job.seed),
      optimizer=optimizer, loss=loss)


def _batches_file(config: ExperimentConfig, run) -> Path:
  """Where the batches of `run` (its data config and steps) are kept."""
  key = hashlib.sha256(repr((run.data, run.train.num_steps)).encode())
  return (Path(config.out_dir) / "batches" /
          f"{run.data.mixture_or_task_name}-seed{run.data.seed}-"
          f"{key.hexdigest()[:12]}.npz")


def batch_readers(config: ExperimentConfig, models: Models,
                  jobs: Iterable[Job]) -> list[Job]:
  """One job of `jobs` per batches file their training runs read (the
  models of a seed and stage read the same batches)."""
  readers = {}
  for job in jobs:
    if job.train:
      path = _batches_file(config, build_run(config, models, job))
      readers.setdefault(path, job)
  return list(readers.values())


def write_batches(config: ExperimentConfig, models: Models, job: Job
                  ) -> Path:
  """Reads the batches of `job`'s training run from SeqIO into their file,
  unless it is there; the file."""
  return _write_batches(config, build_run(config, models, job))


def _write_batches(config: ExperimentConfig, run) -> Path:
  path = _batches_file(config, run)
  if not path.is_file():
    path.parent.mkdir(parents=True, exist_ok=True)
    data.ArrayStream.read(run.data, run.train.num_steps).save(path)
  return path


def _scores_few_shot(job: Job) -> bool:
  """Whether `job` is scored few-shot too: the models that were not
  fine-tuned on the cluster."""
  return job.stage in ("untuned", "instruct_cot") or (
      job.stage == "instruct" and job.train)


def _evaluations(config: ExperimentConfig, cluster: str, few_shot: bool
                 ) -> dict:
  """name -> (mixture, feature lengths) of `cluster`'s zero-shot
  evaluation, and its few-shot one where `few_shot`."""
  lengths = dict(config.instruct_lengths)
  evals = {"zero_shot": (f"mini_flan_eval_{cluster}", lengths)}
  if few_shot:
    evals["few_shot"] = (f"mini_flan_eval_fs_{cluster}",
                         {**lengths, "inputs": config.few_shot_input_length})
  return evals


_EVALUATORS: dict = {}


def _evaluator(job: Job, model, mixture: str, lengths: Mapping[str, int],
               examples: int) -> Evaluator:
  """One `Evaluator` per model (`job`'s spec and eval capacity factor) and
  evaluation in this process: its examples are read and its decoding
  traced once for every job of the process that evaluates that model."""
  key = (job.model, job.eval_capacity_factor, mixture,
         tuple(sorted(lengths.items())), examples)
  if key not in _EVALUATORS:
    _EVALUATORS[key] = Evaluator(
        EvalConfig(mixture, task_feature_lengths=dict(lengths),
                   batch_size=EVAL_BATCH, num_examples=examples),
        model, "enc_dec", None)
  return _EVALUATORS[key]


def evaluate(config: ExperimentConfig, model, job: Job, params,
             cluster: str) -> dict:
  """{eval name: {"score": the mixture's average exact match (each member
  counting once, `eval_averages`), "tasks": {task: exact match}}} of
  `cluster`."""
  out = {}
  evaluations = _evaluations(config, cluster, _scores_few_shot(job))
  for name, (mixture, lengths) in evaluations.items():
    evaluator = _evaluator(job, model, mixture, lengths,
                           config.eval_examples)
    metrics = evaluator.evaluate(params, 0)
    average = f"{mixture}/{eval_averages.AVERAGE}"
    tasks = {task: values["exact_match"] for task, values in metrics.items()
             if not task.endswith(f"/{eval_averages.AVERAGE}")}
    out[name] = {"score": metrics[average]["exact_match"], "tasks": tasks}
  return out


def routing(config: ExperimentConfig, model, params, cluster: str
            ) -> Optional[dict]:
  """{"usage": expert usage, "drop_ratio": tokens no expert processed /
  tokens, "load_cv": std / mean of the tokens each expert receives}, each
  the mean over sparse layers, of `params` routing the first
  `eval_examples` validation examples of each of `cluster`'s zero-shot
  tasks (eval mode); None for a dense model."""
  if model.encoder_moe is None and model.decoder_moe is None:
    return None
  checkpoint = Checkpoint(None, 0, model, build_model(model), params, None)
  batch = _routing_batch(checkpoint, cluster, config.eval_examples,
                         config.instruct_lengths)
  report = route_batch(checkpoint, batch)
  load = routing_monitor.load_stats(report.load_matrix())
  return {"usage": float(analyses.utilization_of(report).mean()),
          "drop_ratio": float(analyses.drops(report).drop_ratio.mean()),
          "load_cv": float(load.cv.mean())}


_ROUTING_BATCHES: dict = {}


def _routing_batch(checkpoint: Checkpoint, cluster: str, examples: int,
                   lengths: Mapping[str, int]) -> dict:
  """The examples `routing` routes, read once per process: they depend on
  the cluster, not on the model (every model here is an encoder-decoder)."""
  key = (cluster, examples, tuple(sorted(lengths.items())))
  if key not in _ROUTING_BATCHES:
    _ROUTING_BATCHES[key] = task_batches.joined(task_batches.task_batches(
        checkpoint, f"mini_flan_eval_{cluster}", examples_per_task=examples,
        task_feature_lengths=lengths))
  return _ROUTING_BATCHES[key]


def constant_baselines(config: ExperimentConfig) -> dict:
  """{cluster: {eval name: the constant-answer baseline's average exact
  match}} on the examples `evaluate` scores (`moe_jax.train.baseline`)."""
  out = {}
  for cluster in config.held_out:
    out[cluster] = {}
    for name, (mixture, lengths) in _evaluations(config, cluster,
                                                 True).items():
      scores = baseline.constant_answer_scores(
          mixture, "validation", lengths, config.eval_examples)
      out[cluster][name] = scores[f"{mixture}/{eval_averages.AVERAGE}"][
          "exact_match"]
  return out


def _final_cross_entropy(model_dir: Path) -> float:
  """Mean training cross entropy over the last 10% of steps, from the
  run's metrics log (so a resumed run reports its whole history)."""
  lines = (model_dir / METRICS_FILE).read_text().splitlines()
  values = [json.loads(line)["cross_entropy"] for line in lines]
  return float(np.mean(values[-max(len(values) // 10, 1):]))


def run_job(config: ExperimentConfig, models: Models, job: Job
            ) -> list[dict]:
  """Trains and / or evaluates `job`; its result rows (reused if
  written)."""
  path = Path(config.out_dir) / "results" / f"{job.name}.json"
  if path.is_file():
    return json.loads(path.read_text())
  start = time.time()
  model = _with_eval_capacity(models[job.model][0], job.eval_capacity_factor)
  train_loss = None
  if job.train:
    run = build_run(config, models, job)
    stream = data.ArrayStream.load(run.data, _write_batches(config, run))
    params = run_lib.train(run, stream).loop.state.params
    train_loss = _final_cross_entropy(_model_dir(config, job))
  else:
    params = checkpoints.restore_params(_model_dir(config, job.init_from))
  counts = flops.count(model, config.instruct_lengths["inputs"],
                       config.instruct_lengths["targets"])
  common = {
      "job": job.name, "model": job.model.name,
      "routing": job.model.routing, "num_experts": job.model.num_experts,
      "seed": job.seed, "stage": job.stage, "ablation": job.ablation,
      "train_loss": train_loss, "params": counts.total_params,
      "forward_flops": counts.forward_flops}
  clusters = () if job.stage == "pretrain" else config.held_out
  rows = [{**common, "cluster": cluster,
           "evals": evaluate(config, model, job, params, cluster),
           "routing": routing(config, model, params, cluster)}
          for cluster in clusters] or [{**common, "cluster": "", "evals": {},
                                        "routing": None}]
  for row in rows:
    row["seconds"] = time.time() - start
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(rows, indent=1))
  print(f"[{job.name}] {rows[0]['seconds']:.0f} s, loss {train_loss}; "
        + "; ".join(f"{r['cluster']}: " + ", ".join(
            f"{k} {v['score']:.1f}" for k, v in r["evals"].items())
                    for r in rows if r["cluster"]), flush=True)
  return rows
