"""The constant-answer baseline of eval tasks: what a model scores that
gives every example of a task one answer, the task's most common correct
answer on the evaluated split (the majority class).

Each task is scored with its own metrics, so the baseline sits beside the
model's score on the same scale: predict metrics (exact match) get the
answer as every prediction; score metrics (rank classification, one row
per option) get score 1 on the rows whose option is that answer and 0
elsewhere. Rows that carry "is_correct" (option rows) count only their
correct option when the answer is chosen. Imports seqio and TensorFlow.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Optional, Sequence

import seqio

from moe_jax.train import eval_averages

Row = Mapping[str, Any]


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def majority_answer(rows: Sequence[Row]) -> str:
  """The most common "targets_pretokenized" among `rows` (those with a true
  "is_correct" where rows have it); ties go to the first seen.

  Raises:
    ValueError: no row counts.
  """
  answers = collections.Counter(
      _text(r["targets_pretokenized"]) for r in rows
      if r.get("is_correct", True))
  if not answers:
    raise ValueError(f"no correct target among {len(rows)} rows")
  return answers.most_common(1)[0][0]


def _value(metric: Any) -> float:
  return float(getattr(metric, "value", metric))


def task_baseline(task: seqio.Task, rows: Sequence[Row]) -> dict[str, float]:
  """{metric: value} of the constant answer `majority_answer(rows)` under
  `task`'s predict and score metrics (`rows`: the task's preprocessed
  examples, as seqio's evaluator reads them)."""
  answer = majority_answer(rows)
  targets = [task.postprocess_fn(_text(r["targets_pretokenized"]),
                                 example=r, is_target=True) for r in rows]
  out = {}
  if task.predict_metric_fns:
    predictions = [task.postprocess_fn(answer, example=r, is_target=False)
                   for r in rows]
    for fn in task.predict_metric_fns:
      out.update(fn(targets, predictions))
  if task.score_metric_fns:
    scores = [float(_text(r["targets_pretokenized"]) == answer)
              for r in rows]
    for fn in task.score_metric_fns:
      out.update(fn(targets, scores))
  return {name: _value(v) for name, v in out.items()}


def constant_answer_scores(mixture_or_task_name: str, split: str,
                           task_feature_lengths: Mapping[str, int],
                           num_examples: Optional[int] = None
                           ) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} of the constant-answer baseline for every task
  of a mixture (or the task) that has `split` and metrics, plus the mixture
  averages `eval_averages.averages` adds; the examples are those
  `evaluation.Evaluator` scores (the first `num_examples`, unshuffled)."""
  out = {}
  for task in seqio.get_subtasks(seqio.get_mixture_or_task(
      mixture_or_task_name)):
    if split not in task.splits or not (task.predict_metric_fns or
                                        task.score_metric_fns):
      continue
    dataset = task.get_dataset(dict(task_feature_lengths), split=split,
                               shuffle=False, num_epochs=1)
    if num_examples:
      dataset = dataset.take(num_examples)
    out[task.name] = task_baseline(task, list(dataset.as_numpy_iterator()))
  out.update(eval_averages.averages(mixture_or_task_name, out))
  return out
