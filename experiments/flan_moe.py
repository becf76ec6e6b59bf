"""FLAN-MoE at small scale: do sparse models gain more from instruction
tuning than FLOP-matched dense ones?

  nice -n 10 python -m experiments.flan_moe \
      --gin_file=experiments/gin/reduced.gin [--gin.ExperimentConfig.seeds=(0,)]

After Shen et al., "Mixture-of-Experts Meets Instruction Tuning" (ICLR 2024).
Every model (`variants.ModelSpec`, FLOP-matched to the dense one) is
pre-trained with span corruption on generated text, then, with the held-out
task clusters H of the mini_flan suite (`held_out`):

  untuned            the pre-trained model, evaluated zero- and few-shot
  finetune           fine-tuned on the zero-shot tasks of every cluster in H
                     together (no instruction tuning)
  instruct           instruction-tuned on every task outside H
                     (`jobs.held_out_mixtures`), evaluated zero-shot
                     (`mini_flan_eval_C`) and few-shot (`mini_flan_eval_fs_C`)
                     on each cluster C of H
  instruct_finetune  the instruction-tuned model fine-tuned as `finetune`

Every stage is scored on each cluster C of H separately: exact match
(percent) on the validation split, averaged over C's tasks, beside the
constant-answer baseline of those tasks. Ablations (one seed,
`ablation_seed`, around the model `ablation_base`): number of experts and
routing strategy (whole chain), routing-loss type and frozen router / experts
during instruction tuning, and the capacity factor at evaluation of the
instruction-tuned model.

Jobs run in phases (pre-training; fine-tuning and instruction tuning;
fine-tuning after instruction tuning and evaluation-only jobs), one phase
after the other on the same `workers` processes. Before them, the training
batches are read once per data config (`jobs.write_batches`; the models of
one seed and stage share them). A job whose result file
exists is not run again, so an interrupted experiment resumes. Results:
OUT_DIR/results/*.json, then the table and plots (`experiments.report`) in
`report_dir`.
"""

from __future__ import annotations

import functools
import multiprocessing
import sys
import time
from typing import Callable, Sequence

import gin

from experiments import jobs, plan, report, variants
from experiments.config import ExperimentConfig
from moe_jax import gin_utils


def main(argv: Sequence[str]) -> int:
  bindings, rest = gin_utils.split_gin_flags(argv)
  files = [a.split("=", 1)[1] for a in rest if a.startswith("--gin_file=")]
  if len(files) != len(rest):
    raise ValueError(f"unknown arguments {rest}; give --gin_file=... and "
                     "--gin.KEY=VALUE")
  gin_utils.parse(files, bindings)
  config = ExperimentConfig()
  gin.clear_config()
  start = time.time()
  rows = run_experiment(config)
  _, models = _phases_and_models(config)
  report.write(config, rows, wall_seconds=time.time() - start,
               settings=variants.settings_table(models,
                                                config.instruct_lengths),
               baselines=jobs.constant_baselines(config))
  print(f"{len(rows)} results in {time.time() - start:.0f} s; report in "
        f"{config.reports_to}")
  return 0


def _phases_and_models(config: ExperimentConfig) -> tuple[list, dict]:
  """The job phases of `plan(config)` and their models
  (`jobs.resolve_models`)."""
  phases = plan.plan(config)
  return phases, jobs.resolve_models(config, {j.model for p in phases
                                              for j in p})


def run_experiment(config: ExperimentConfig) -> list[dict]:
  """Runs (or reuses) every job of `plan(config)`, phase after phase; their
  result rows. With `workers` > 1 one pool serves every phase, so each
  worker starts (imports, first traces, evaluators) once."""
  jobs.init_worker(config)
  phases, models = _phases_and_models(config)
  if config.workers == 1:
    return _run_phases(config, models, phases,
                       lambda f, calls: [f(*call) for call in calls])
  context = multiprocessing.get_context("spawn")
  with context.Pool(config.workers, initializer=jobs.init_worker,
                    initargs=(config,)) as pool:
    return _run_phases(config, models, phases,
                       functools.partial(pool.starmap, chunksize=1))


def _run_phases(config: ExperimentConfig, models: dict, phases: list,
                starmap: Callable) -> list[dict]:
  """Reads the training batches, then runs the phases, each one's jobs by
  `starmap(function, argument tuples)`; the result rows."""
  readers = jobs.batch_readers(config, models,
                               [job for phase in phases for job in phase])
  calls = [[(config, models, job) for job in phase]
           for phase in [readers, *phases]]
  starmap(jobs.write_batches, calls[0])
  return [row for phase in calls[1:]
          for job_rows in starmap(jobs.run_job, phase)
          for row in job_rows]


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
