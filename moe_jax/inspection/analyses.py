"""FLAN-MoE's routing analyses of a checkpoint: expert utilization per task,
dropped tokens, routing change between two checkpoints, and the eval
capacity factor's effect.

Dimension names (moe_jax's glossary): B batch, L length, E experts, R sparse
layers (encoder layers first, then decoder layers).

Each analysis returns a frozen result whose `rows()` are the records of its
table (`tables.write_table` writes them as CSV or markdown) and that
`analysis_plots` draws. `Batches` maps a name (a task, or a task cluster) to
the model's input features of that name's examples.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.inspection.checkpoint import Checkpoint
from moe_jax.inspection.routing_report import RoutingReport, route_batch
from moe_jax.models import build_model
from moe_jax.train.step import model_inputs

Batch = Mapping[str, np.ndarray]
Batches = Mapping[str, Batch]


@dataclasses.dataclass(frozen=True)
class Utilization:
  """Expert utilization (FLAN-MoE: tokens dispatched / expert capacity,
  averaged over experts) of each batch.

  Attributes:
    names: the batches' names (tasks or clusters), N of them.
    layers: the R sparse layers' names.
    usage: <float64>[N, R] dispatched (token, expert) pairs / (E x
      capacity) per layer, in eval mode.
  """
  names: tuple[str, ...]
  layers: tuple[str, ...]
  usage: np.ndarray

  def rows(self) -> list[dict[str, Any]]:
    """Per name: its usage in each layer and the mean over layers."""
    return [{"name": name, **dict(zip(self.layers, map(float, row))),
             "mean": float(row.mean())}
            for name, row in zip(self.names, self.usage)]


def utilization_of(report: RoutingReport) -> np.ndarray:
  """<float64>[R] the expert usage of each sparse layer of `report`."""
  return np.array([l.expert_usage for l in report.layers], np.float64)


def utilization(checkpoint: Checkpoint, batches: Batches) -> Utilization:
  """Routes each of `batches` and reads its per-layer expert usage."""
  reports = {name: route_batch(checkpoint, batch)
             for name, batch in batches.items()}
  first = next(iter(reports.values()))
  return Utilization(
      tuple(reports), tuple(first.layer_names()),
      np.array([utilization_of(r) for r in reports.values()]))


@dataclasses.dataclass(frozen=True)
class DroppedToken:
  """One vocabulary id's drops, over every sparse layer of its stack.

  Attributes:
    token: the decoded id (the id itself without a vocabulary).
    dropped: (token position, sparse layer) pairs where no expert processed
      it.
    seen: (token position, sparse layer) pairs where it was routed.
  """
  token: str
  dropped: int
  seen: int

  @property
  def rate(self) -> float:
    return self.dropped / self.seen


@dataclasses.dataclass(frozen=True)
class Drops:
  """Dropped tokens of one batch.

  Attributes:
    layers: the R sparse layers' names.
    drop_ratio: <float64>[R] real tokens no expert processed / real tokens.
    tokens: the most dropped ids, most drops first (ties: higher rate).
  """
  layers: tuple[str, ...]
  drop_ratio: np.ndarray
  tokens: tuple[DroppedToken, ...]

  def rows(self) -> list[dict[str, Any]]:
    """Per layer: its drop ratio."""
    return [{"layer": name, "drop_ratio": float(ratio)}
            for name, ratio in zip(self.layers, self.drop_ratio)]

  def token_rows(self) -> list[dict[str, Any]]:
    """Per most-dropped id: its drops, routings and their ratio."""
    return [{"token": t.token, "dropped": t.dropped, "seen": t.seen,
             "rate": t.rate} for t in self.tokens]


def drops(report: RoutingReport, top: int = 20) -> Drops:
  """Per-layer drop ratio and the `top` most dropped ids of `report`."""
  dropped, seen = collections.Counter(), collections.Counter()
  for layer in report.layers:
    ids = report.tokens[layer.stack]
    left = layer.token_mask & ~layer.dispatch_mask.any(-1)
    dropped.update(ids[left].tolist())
    seen.update(ids[layer.token_mask].tolist())
  order = sorted(dropped, key=lambda t: (-dropped[t], -dropped[t] / seen[t],
                                         t))
  return Drops(
      tuple(report.layer_names()),
      np.array([l.fraction_tokens_left_behind for l in report.layers]),
      tuple(DroppedToken(report.token_text(t), dropped[t], seen[t])
            for t in order[:top]))


@dataclasses.dataclass(frozen=True)
class RoutingChange:
  """How the router's first choice moved between two checkpoints.

  Attributes:
    layers: the R sparse layers' names.
    changed: <float64>[R] real tokens whose top-1 expert (largest router
      probability, before capacity) differs / real tokens.
    labels: names of the two checkpoints (e.g. their steps).
  """
  layers: tuple[str, ...]
  changed: np.ndarray
  labels: tuple[str, str]

  def rows(self) -> list[dict[str, Any]]:
    return [{"layer": name, "top1_changed": float(value)}
            for name, value in zip(self.layers, self.changed)]


def routing_change(before: RoutingReport, after: RoutingReport,
                   labels: tuple[str, str] = ("before", "after")
                   ) -> RoutingChange:
  """Compares two reports of the same batch through two checkpoints of one
  model.

  Raises:
    ValueError: the reports' layers or tokens differ.
  """
  if before.layer_names() != after.layer_names():
    raise ValueError(f"the checkpoints' sparse layers differ: "
                     f"{before.layer_names()} vs {after.layer_names()}")
  for stack, ids in before.tokens.items():
    if not np.array_equal(ids, after.tokens[stack]):
      raise ValueError(f"the reports routed different {stack} tokens; "
                       "route the same batch through both checkpoints")
  changed = []
  for a, b in zip(before.layers, after.layers):
    moved = np.argmax(a.router_probs, -1) != np.argmax(b.router_probs, -1)
    changed.append(np.sum(moved & a.token_mask) /
                   max(np.sum(a.token_mask), 1))
  return RoutingChange(tuple(before.layer_names()), np.array(changed),
                       labels)


def compare_checkpoints(before: Checkpoint, after: Checkpoint, batch: Batch
                        ) -> RoutingChange:
  """`routing_change` of `batch` through `before` and `after` (labelled by
  their steps)."""
  return routing_change(route_batch(before, batch), route_batch(after, batch),
                        (f"step {before.step}", f"step {after.step}"))


@dataclasses.dataclass(frozen=True)
class CapacitySweep:
  """Eval-mode score and drops of one batch per eval capacity factor.

  Attributes:
    factors: the F eval capacity factors.
    layers: the R sparse layers' names.
    accuracy: <float64>[F] teacher-forced target-token accuracy (argmax of
      the logits = target, over target tokens with loss weight).
    cross_entropy: <float64>[F] mean cross entropy (nats) per target token.
    drop_fraction: <float64>[F, R] real tokens no expert processed / real
      tokens.
  """
  factors: tuple[float, ...]
  layers: tuple[str, ...]
  accuracy: np.ndarray
  cross_entropy: np.ndarray
  drop_fraction: np.ndarray

  def rows(self) -> list[dict[str, Any]]:
    """Per factor: score, mean drop fraction over layers, and per layer."""
    return [{"eval_capacity_factor": f, "accuracy": float(acc),
             "cross_entropy": float(ce), "drop_fraction": float(d.mean()),
             **{f"drop/{name}": float(v) for name, v in zip(self.layers, d)}}
            for f, acc, ce, d in zip(self.factors, self.accuracy,
                                     self.cross_entropy, self.drop_fraction)]


def _target_weights(batch: Batch) -> np.ndarray:
  if "decoder_loss_weights" in batch:
    return np.asarray(batch["decoder_loss_weights"], np.float32)
  return (np.asarray(batch["decoder_target_tokens"]) > 0).astype(np.float32)


def _score(model, variables, inputs, targets, weights):
  """(correct targets, summed cross entropy, <[R]> drop fractions)."""
  output = model.apply(variables, **inputs, enable_dropout=False)
  log_probs = jax.nn.log_softmax(output.logits.astype(jnp.float32))
  on_target = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  correct = jnp.argmax(output.logits, -1) == targets
  return (jnp.sum(correct * weights), -jnp.sum(on_target * weights),
          output.moe_stats.fraction_tokens_left_behind)


def capacity_sweep(checkpoint: Checkpoint, batch: Batch,
                   factors: Sequence[float]) -> CapacitySweep:
  """Scores `batch` with every sparse layer's eval capacity factor set to
  each of `factors` (the restored parameters unchanged)."""
  inputs = {k: np.asarray(v) for k, v in model_inputs(batch).items()}
  targets = np.asarray(batch["decoder_target_tokens"])
  weights = _target_weights(batch)
  total = max(float(weights.sum()), 1.0)
  accuracy, entropy, dropped = [], [], []
  for factor in factors:
    model = build_model(checkpoint.config.with_moe_layers(
        eval_capacity_factor=float(factor)))
    correct, summed, left = jax.jit(lambda v, m=model: _score(
        m, v, inputs, targets, weights))(checkpoint.variables())
    accuracy.append(float(correct) / total)
    entropy.append(float(summed) / total)
    dropped.append(np.asarray(left, np.float64))
  layers = route_batch(checkpoint, batch).layer_names()
  return CapacitySweep(tuple(float(f) for f in factors), tuple(layers),
                       np.array(accuracy), np.array(entropy),
                       np.stack(dropped))
