"""Averages of per-task eval metrics over a SeqIO mixture and its parts.

A task's `score` is the mean of its metrics (the eval suites report one
metric per task). A mixture's average is the mean over its members, each
member counting once: a task, or a sub-mixture through its own average.
So `mmlu_5shot` averages its 57 subjects, and a mixture of the MMLU, BBH
and reasoning mixtures averages the three benchmark averages (a macro
average, as FLAN-MoE reports), not the 87 tasks. Each metric name is also
averaged over the members that report it.
"""

from typing import Dict, List, Mapping

import numpy as np
import seqio

Metrics = Mapping[str, float]
AVERAGE = "average"
SCORE = "score"


def _mean_of(members: List[Metrics]) -> Dict[str, float]:
  names = sorted({k for m in members for k in m})
  out = {k: float(np.mean([m[k] for m in members if k in m])) for k in names}
  out[SCORE] = float(np.mean([m[SCORE] for m in members]))
  return out


def _average(mixture: seqio.Mixture, per_task: Mapping[str, Metrics],
             out: Dict[str, Dict[str, float]]) -> Dict[str, float]:
  # seqio keeps a mixture's sub-mixtures in `_sub_mixtures` (no public API).
  subs = list(getattr(mixture, "_sub_mixtures", []))
  nested = {t.name for sub in subs for t in sub.tasks}
  members = [_average(sub, per_task, out) for sub in subs]
  for task in mixture.tasks:
    if task.name not in nested and task.name in per_task:
      metrics = dict(per_task[task.name])
      metrics[SCORE] = float(np.mean(list(metrics.values())))
      members.append(metrics)
  out[f"{mixture.name}/{AVERAGE}"] = _mean_of(members)
  return out[f"{mixture.name}/{AVERAGE}"]


def averages(name: str, per_task: Mapping[str, Metrics]
             ) -> Dict[str, Dict[str, float]]:
  """{"<mixture>/average": {metric: mean, "score": mean}} for mixture `name`
  and each of its sub-mixtures; {} when `name` is a task."""
  if name not in seqio.MixtureRegistry.names():
    return {}
  out: Dict[str, Dict[str, float]] = {}
  _average(seqio.get_mixture_or_task(name), per_task, out)
  return out
