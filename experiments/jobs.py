"""Running one `plan.Job`: build its `moe_jax.train.run.Run`, train,
evaluate, and write its result row (OUT_DIR/results/<job name>.json).

A result row holds the job's fields, the model's size and forward FLOPs per
example, the final training cross entropy (mean of the last 10% of steps),
and per evaluation ("zero_shot", "few_shot") the mean exact match (percent)
over the mixture's tasks and each task's score.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Mapping, Optional

import jax
import numpy as np

import tasks  # noqa: F401  (registers mini_flan)
from experiments import variants
from experiments.config import AUX_LOSSES, PRETRAIN_TASK, ExperimentConfig
from experiments.plan import Job
from experiments.variants import ModelSpec
from moe_jax import flops
from moe_jax.train import checkpoints, eval_averages
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
    if job.stage == "instruct":
      mixture = f"mini_flan_train_without_{job.cluster}"
      steps = config.instruct_steps
    else:
      mixture, steps = f"mini_flan_{job.cluster}", config.finetune_steps
    optimizer = OptimizerConfig(
        learning_rate=config.tune_learning_rate, schedule="constant",
        warmup_steps=config.warmup_steps, total_steps=steps,
        freeze=job.freeze)
  init = (str(_model_dir(config, job.init_from))
          if job.init_from is not None else None)
  return run_lib.Run(
      model=model,
      train=run_lib.TrainConfig(
          model_dir=str(_model_dir(config, job)), num_steps=steps,
          save_every=steps, keep_checkpoints=1, log_every=max(steps // 2, 1),
          seed=job.seed, init_checkpoint=init, async_checkpointing=False),
      data=DataConfig(mixture, dict(lengths), batch_size=config.batch_size,
                      seed=job.seed),
      optimizer=optimizer, loss=loss)


def _evaluations(config: ExperimentConfig, job: Job) -> dict:
  """name -> (mixture, feature lengths) that `job` is scored on."""
  if job.stage == "pretrain":
    return {}
  lengths = dict(config.instruct_lengths)
  evals = {"zero_shot": (f"mini_flan_eval_{job.cluster}", lengths)}
  if job.stage == "untuned" or (job.stage == "instruct" and job.train):
    evals["few_shot"] = (f"mini_flan_eval_fs_{job.cluster}",
                         {**lengths, "inputs": config.few_shot_input_length})
  return evals


def evaluate(config: ExperimentConfig, model, job: Job, params) -> dict:
  """{eval name: {"score": the mixture's average exact match (each member
  counting once, `eval_averages`), "tasks": {task: exact match}}}."""
  out = {}
  for name, (mixture, lengths) in _evaluations(config, job).items():
    evaluator = Evaluator(
        EvalConfig(mixture, task_feature_lengths=lengths,
                   batch_size=EVAL_BATCH, num_examples=config.eval_examples),
        model, "enc_dec", None)
    metrics = evaluator.evaluate(params, 0)
    average = f"{mixture}/{eval_averages.AVERAGE}"
    tasks = {task: values["exact_match"] for task, values in metrics.items()
             if not task.endswith(f"/{eval_averages.AVERAGE}")}
    out[name] = {"score": metrics[average]["exact_match"], "tasks": tasks}
  return out


def _final_cross_entropy(model_dir: Path) -> float:
  """Mean training cross entropy over the last 10% of steps, from the
  run's metrics log (so a resumed run reports its whole history)."""
  lines = (model_dir / METRICS_FILE).read_text().splitlines()
  values = [json.loads(line)["cross_entropy"] for line in lines]
  return float(np.mean(values[-max(len(values) // 10, 1):]))


def run_job(config: ExperimentConfig, models: Models, job: Job) -> dict:
  """Trains and / or evaluates `job`; its result row (reused if written)."""
  path = Path(config.out_dir) / "results" / f"{job.name}.json"
  if path.is_file():
    return json.loads(path.read_text())
  start = time.time()
  model = _with_eval_capacity(models[job.model][0], job.eval_capacity_factor)
  train_loss = None
  if job.train:
    params = run_lib.train(build_run(config, models, job)).loop.state.params
    train_loss = _final_cross_entropy(_model_dir(config, job))
  else:
    params = checkpoints.restore_params(_model_dir(config, job.init_from))
  counts = flops.count(model, config.instruct_lengths["inputs"],
                       config.instruct_lengths["targets"])
  row = {
      "job": job.name, "model": job.model.name,
      "routing": job.model.routing, "num_experts": job.model.num_experts,
      "seed": job.seed, "stage": job.stage, "cluster": job.cluster,
      "ablation": job.ablation, "train_loss": train_loss,
      "evals": evaluate(config, model, job, params),
      "params": counts.total_params, "forward_flops": counts.forward_flops,
      "seconds": time.time() - start}
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(row, indent=1))
  print(f"[{job.name}] {row['seconds']:.0f} s, loss {train_loss}, "
        + ", ".join(f"{k} {v['score']:.1f}" for k, v in row["evals"].items()),
        flush=True)
  return row
