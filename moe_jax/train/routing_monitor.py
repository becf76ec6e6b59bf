"""Routing health while training: load statistics, dead experts, warnings.

Dimension names: R sparse layers (encoder layers first, then decoder
layers), E experts.

The training loop logs, per sparse layer i, the per-expert load
`expert_load/layer_<i>` (<[E]> tokens dispatched to each expert), the drop
fraction `fraction_tokens_left_behind/layer_<i>` and the router entropy
`router_entropy/layer_<i>`. The pure functions here derive the load
statistics from such loads (tests and notebooks call them on loads read
back from metrics.jsonl); `RoutingMonitor` holds the one piece of state,
how many steps each expert has received nothing, and turns the thresholds
of `MonitorConfig` (gin) into `RoutingWarning`s.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import numpy as np

from moe_jax.moe import metric_names

EXPERT_LOAD = metric_names.EXPERT_LOAD
DROP_FRACTION = metric_names.FRACTION_TOKENS_LEFT_BEHIND
ROUTER_ENTROPY = metric_names.ROUTER_ENTROPY
# What the monitor adds, per layer (`<name>/layer_<i>`).
LOAD_CV = "load_cv"
LOAD_MAX_OVER_MEAN = "load_max_over_mean"
LOAD_MIN_OVER_MEAN = "load_min_over_mean"
DEAD_EXPERTS = "dead_experts"
# The metrics.jsonl field holding the warnings raised at a step.
WARNINGS = "routing_warnings"


def layer_key(name: str, layer: int) -> str:
  """The logged name of metric `name` of sparse layer `layer`."""
  return f"{name}/layer_{layer}"


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
  """Thresholds of the routing warnings (gin:
  `routing_monitor.MonitorConfig.<knob>`).

  Attributes:
    max_load_cv: warn when a layer's load CV (std / mean of its per-expert
      load) rises above this; None: never. A uniform load has CV 0, all
      tokens on one expert sqrt(E - 1).
    max_drop_fraction: warn when a layer's fraction of tokens processed by
      no expert rises above this; None: never.
    dead_expert_steps: an expert that received no token for this many
      consecutive steps is dead: counted in `dead_experts/layer_<i>` and
      warned about once, when it gets there. Counting restarts when a run
      resumes.
  """
  max_load_cv: Optional[float] = 1.0
  max_drop_fraction: Optional[float] = 0.3
  dead_expert_steps: int = 100

  def __post_init__(self):
    for knob in ("max_load_cv", "max_drop_fraction"):
      value = getattr(self, knob)
      if value is not None and value < 0:
        raise ValueError(f"{knob} must be >= 0 (or None: no warning); got "
                         f"{knob}={value}")
    if self.dead_expert_steps < 1:
      raise ValueError("dead_expert_steps must be >= 1; got "
                       f"dead_expert_steps={self.dead_expert_steps}")


@dataclasses.dataclass(frozen=True)
class LoadStats:
  """Load statistics of R layers.

  Attributes:
    cv: <float64>[R] std / mean over experts of the load (0 when no token
      was routed).
    max_over_mean: <float64>[R] the busiest expert's load / the mean load.
    min_over_mean: <float64>[R] the idlest expert's load / the mean load
      (max / min is their ratio; this stays finite when an expert is idle).
    idle: <bool>[R, E] the expert received no token.
  """
  cv: np.ndarray
  max_over_mean: np.ndarray
  min_over_mean: np.ndarray
  idle: np.ndarray


def load_stats(load: np.ndarray) -> LoadStats:
  """Statistics of per-expert loads <[R, E]> (tokens per expert)."""
  load = np.asarray(load, np.float64)
  mean = load.mean(axis=-1)
  routed = mean > 0
  safe_mean = np.where(routed, mean, 1.0)
  ratio = lambda x: np.where(routed, x / safe_mean, 0.0)
  return LoadStats(cv=ratio(load.std(axis=-1)),
                   max_over_mean=ratio(load.max(axis=-1)),
                   min_over_mean=ratio(load.min(axis=-1)),
                   idle=load == 0)


def layer_values(metrics: Mapping[str, object], name: str) -> np.ndarray:
  """`name/layer_0`, `name/layer_1`, ... of `metrics` stacked: <[R]> for a
  scalar per layer, <[R, E]> for the per-expert load; empty if absent."""
  values = []
  while layer_key(name, len(values)) in metrics:
    values.append(metrics[layer_key(name, len(values))])
  return np.asarray(values, np.float64)


@dataclasses.dataclass(frozen=True)
class RoutingWarning:
  """A routing problem seen at `step`.

  Attributes:
    kind: `LOAD_CV`, `DROP_FRACTION` or `DEAD_EXPERTS`.
    layer: the sparse layer (index into R).
    value: the load CV, the drop fraction, or the steps without a token.
    threshold: the `MonitorConfig` knob's value it crossed.
    expert: the dead expert (kind `DEAD_EXPERTS` only).
  """
  step: int
  kind: str
  layer: int
  value: float
  threshold: float
  expert: Optional[int] = None

  @property
  def message(self) -> str:
    where = f"step {self.step}, sparse layer {self.layer}"
    if self.kind == DEAD_EXPERTS:
      return (f"{where}: expert {self.expert} received no token for "
              f"{self.value:g} steps (dead_expert_steps={self.threshold:g})")
    knob = "max_load_cv" if self.kind == LOAD_CV else "max_drop_fraction"
    what = "load CV" if self.kind == LOAD_CV else "drop fraction"
    return (f"{where}: {what} {self.value:.3f} > {knob}="
            f"{self.threshold:g}")


@dataclasses.dataclass(frozen=True)
class MonitorReport:
  """Attributes:
    metrics: the derived per-layer metrics ({`layer_key(name, i)`: float}).
    warnings: the warnings raised at this step.
  """
  metrics: dict[str, float]
  warnings: tuple[RoutingWarning, ...]


class RoutingMonitor:
  """`monitor(step, metrics)` after every step, in step order.

  A load-CV or drop-fraction warning is raised on the step a layer's value
  rises above its threshold (not again while it stays above); a dead-expert
  warning on the step an expert's run of steps without a token reaches
  `dead_expert_steps`.
  """

  def __init__(self, config: MonitorConfig):
    self._config = config
    self._idle_steps: Optional[np.ndarray] = None  # <int>[R, E]
    self._above: dict[str, np.ndarray] = {}        # kind -> <bool>[R]

  def __call__(self, step: int, metrics: Mapping[str, object]
               ) -> MonitorReport:
    load = layer_values(metrics, EXPERT_LOAD)
    if load.size == 0:  # a dense model
      return MonitorReport({}, ())
    stats = load_stats(load)
    previous = (0 if self._idle_steps is None else self._idle_steps)
    self._idle_steps = np.where(stats.idle, previous + 1, 0)
    needed = self._config.dead_expert_steps
    derived = {LOAD_CV: stats.cv, LOAD_MAX_OVER_MEAN: stats.max_over_mean,
               LOAD_MIN_OVER_MEAN: stats.min_over_mean,
               DEAD_EXPERTS: np.sum(self._idle_steps >= needed, axis=-1)}
    out = {layer_key(name, i): float(v) for name, values in derived.items()
           for i, v in enumerate(values)}
    warnings = []
    for kind, values, threshold in (
        (LOAD_CV, stats.cv, self._config.max_load_cv),
        (DROP_FRACTION, layer_values(metrics, DROP_FRACTION),
         self._config.max_drop_fraction)):
      if threshold is None or values.size == 0:
        continue
      above = values > threshold
      crossed = above & ~self._above.get(kind, np.zeros_like(above))
      self._above[kind] = above
      warnings += [RoutingWarning(step, kind, int(i), float(values[i]),
                                  threshold) for i in np.flatnonzero(crossed)]
    warnings += [RoutingWarning(step, DEAD_EXPERTS, int(i), needed, needed,
                                int(e))
                 for i, e in np.argwhere(self._idle_steps == needed)]
    return MonitorReport(out, tuple(warnings))


def _worst(metrics: Mapping[str, object], name: str, highest: bool = True
           ) -> str:
  values = layer_values(metrics, name)
  layer = int(np.argmax(values) if highest else np.argmin(values))
  return f"{values[layer]:.3g} (layer {layer})"


def console_summary(metrics: Mapping[str, object]) -> str:
  """One line on the worst sparse layer of each routing statistic in
  `metrics` (a step's metrics with the monitor's added); '' for a dense
  model."""
  load = layer_values(metrics, EXPERT_LOAD)
  if load.size == 0:
    return ""
  dead = layer_values(metrics, DEAD_EXPERTS).astype(int)
  parts = [f"load cv max {_worst(metrics, LOAD_CV)}",
           f"max/mean {_worst(metrics, LOAD_MAX_OVER_MEAN)}",
           f"min/mean {_worst(metrics, LOAD_MIN_OVER_MEAN, highest=False)}",
           f"dead experts {int(dead.sum())}/{load.size}"]
  if layer_values(metrics, DROP_FRACTION).size:
    parts.append(f"dropped max {_worst(metrics, DROP_FRACTION)}")
  if layer_values(metrics, ROUTER_ENTROPY).size:
    parts.append(f"entropy min "
                 f"{_worst(metrics, ROUTER_ENTROPY, highest=False)}")
  return "  routing: " + "  ".join(parts)
