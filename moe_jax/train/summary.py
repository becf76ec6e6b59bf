"""The end-of-run summary the `train` command prints."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from moe_jax.moe import metric_names
from moe_jax.train import routing_monitor


def _mean(history: list[dict], key: str, rows: slice) -> float:
  values = [h[key] for h in history[rows] if key in h]
  return float(np.mean(values)) if values else float("nan")


def format_eval(metrics: Mapping[str, Mapping[str, float]],
                baselines: Optional[Mapping[str, Mapping[str, float]]] = None
                ) -> list[str]:
  """One line per task (and mixture average) of `metrics` {task: {metric:
  value}}, each value followed by its constant-answer baseline
  (`baseline.constant_answer_scores`) where `baselines` has it."""
  lines = []
  for task, values in sorted(metrics.items()):
    reference = (baselines or {}).get(task, {})
    shown = ", ".join(
        f"{k} {v:.1f}" + (f" (constant {reference[k]:.1f})"
                          if k in reference else "")
        for k, v in values.items())
    lines.append(f"    {task:<40} {shown}")
  return lines


def format_summary(run, result, baselines: Optional[Mapping[
    str, Mapping[str, float]]] = None) -> str:
  """Loss at the start and end of the run, routing statistics of the last
  steps, and the last evaluation beside `baselines` (`run`: a `run.Run`,
  `result`: its `run.TrainResult`; `format_eval`)."""
  history = result.loop.history
  lines = [f"run summary ({run.train.model_dir})"]
  if result.loop.resumed_from is not None:
    lines.append(f"  resumed from step {result.loop.resumed_from}")
  if history:
    window = max(1, min(20, len(history) // 5))
    first = _mean(history, "cross_entropy", slice(0, window))
    last = _mean(history, "cross_entropy", slice(-window, None))
    lines.append(f"  cross entropy: {first:.3f} (first {window} steps) -> "
                 f"{last:.3f} (last {window}), step {history[-1]['step']}")
    for name in (metric_names.SCALAR_METRICS +
                 metric_names.EXTRA_SCALAR_METRICS):
      if name in history[-1]:
        lines.append(f"  {name:<28} {_mean(history, name, slice(-window, None)):.4f}")
    loads = [routing_monitor.layer_values(h, routing_monitor.EXPERT_LOAD)
             for h in history[-window:]]
    if loads[-1].size:
      cv = routing_monitor.load_stats(np.mean(loads, axis=0)).cv
      lines.append(f"  {'load_cv (worst layer)':<28} {cv.max():.4f} (layer "
                   f"{int(cv.argmax())}, load of the last {window} steps)")
  if result.loop.preempted:
    lines.append("  stopped early by a signal; the checkpoint is saved")
  if result.eval_metrics:
    step = max(result.eval_metrics)
    lines.append(f"  evaluation at step {step} ({run.eval.split} split):")
    lines += format_eval(result.eval_metrics[step], baselines)
  return "\n".join(lines)
