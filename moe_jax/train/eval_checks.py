"""What an evaluation asks of the model, checked when the run is resolved
(before training) rather than when the first evaluation fails.

A SeqIO task's metrics need model outputs: predictions (generation) or
scores (log-likelihood of the targets, rank classification). moe_jax's
evaluator (`moe_jax.train.evaluation.ModelFns`) gives

  enc_dec     predictions (decoding after the encoder) and scores
  prefix_lm   predictions (continuing the inputs as a prompt) and scores
  lm          scores only: its features hold no prompt to continue

and the objective's feature converter needs "inputs" (enc_dec, prefix_lm)
and "targets" from every task.
"""

from __future__ import annotations

from typing import Sequence

import seqio
from seqio import metrics as seqio_metrics

from moe_jax.train.data import Objective

Output = seqio_metrics.ModelOutputType

OUTPUTS = {
    Objective.ENC_DEC: {Output.PREDICTION, Output.SCORE},
    Objective.PREFIX_LM: {Output.PREDICTION, Output.SCORE},
    Objective.LM: {Output.SCORE},
}
FEATURES = {
    Objective.ENC_DEC: ("inputs", "targets"),
    Objective.PREFIX_LM: ("inputs", "targets"),
    Objective.LM: ("targets",),
}


def _no_predictions(objective: Objective) -> str:
  return (f"objective={objective.value}: its features hold no prompt to "
          "continue, so the model gives no predictions (generation); use "
          "objective=prefix_lm, or evaluate tasks with score metrics only")


def check_predict(objective: Objective) -> None:
  """Raises ValueError when `objective`'s model cannot generate."""
  objective = Objective(objective)
  if Output.PREDICTION not in OUTPUTS[objective]:
    raise ValueError(_no_predictions(objective))


def _needs(task: seqio.Task) -> set[Output]:
  return {metric.model_output_type for metric in task.metric_objs}


def check_eval_tasks(mixture_or_task_name: str, split: str,
                     objective: Objective) -> None:
  """Raises ValueError naming the task, and what it needs, when a task of
  `mixture_or_task_name` that SeqIO would evaluate on `split` needs a model
  output or a feature that `objective`'s model does not have."""
  objective = Objective(objective)
  tasks: Sequence[seqio.Task] = seqio.get_subtasks(
      seqio.get_mixture_or_task(mixture_or_task_name))
  for task in seqio.evaluation.get_valid_eval_tasks(tasks, split):
    missing = [f for f in FEATURES[objective]
               if f not in task.output_features]
    if missing:
      raise ValueError(
          f"eval task {task.name} has no feature {missing[0]!r}, which "
          f"objective={objective.value} needs (its output_features: "
          f"{sorted(task.output_features)})")
    lacking = _needs(task) - OUTPUTS[objective]
    if Output.PREDICTION in lacking:
      raise ValueError(f"eval task {task.name} has prediction metrics; "
                       f"{_no_predictions(objective)}")
    if lacking:
      names = sorted(Output.to_str(o) for o in lacking)
      raise ValueError(
          f"eval task {task.name} has metrics of model output {names}, "
          "which moe_jax's evaluator does not compute (it gives "
          f"{sorted(Output.to_str(o) for o in OUTPUTS[objective])})")
