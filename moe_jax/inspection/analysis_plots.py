"""Matplotlib figures of the `analyses` results (Agg backend).

Every function returns the figure and, given `path`, also saves it as PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from moe_jax.inspection.analyses import (CapacitySweep, Drops, RoutingChange,
                                         Utilization)
from moe_jax.inspection.plots import finish, plt


def _layer_axis(ax, layers):
  ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")


def utilization_heatmap(result: Utilization,
                        path: Optional[str | Path] = None):
  """Name (task or cluster) x layer heatmap of expert utilization."""
  fig, ax = plt.subplots(figsize=(2 + 0.7 * len(result.layers),
                                  1.5 + 0.35 * len(result.names)))
  image = ax.imshow(result.usage, cmap="viridis", aspect="auto", vmin=0,
                    vmax=1)
  _layer_axis(ax, result.layers)
  ax.set_yticks(range(len(result.names)), result.names)
  ax.set_title("expert utilization (dispatched / capacity)")
  fig.colorbar(image, ax=ax)
  return finish(fig, path)


def drop_bars(result: Drops, path: Optional[str | Path] = None):
  """Drop ratio per layer, and the most dropped tokens' drop counts."""
  fig, (left, right) = plt.subplots(1, 2, figsize=(
      3 + 0.6 * (len(result.layers) + len(result.tokens)), 3.5))
  left.bar(range(len(result.layers)), result.drop_ratio)
  _layer_axis(left, result.layers)
  left.set_ylim(0, 1)
  left.set_ylabel("drop ratio")
  right.bar(range(len(result.tokens)), [t.dropped for t in result.tokens])
  right.set_xticks(range(len(result.tokens)),
                   [repr(t.token) for t in result.tokens], rotation=90)
  right.set_ylabel("drops (positions x layers)")
  right.set_title("most dropped tokens")
  return finish(fig, path)


def routing_change_bars(result: RoutingChange,
                        path: Optional[str | Path] = None):
  """Fraction of tokens whose top-1 expert changed, per layer."""
  fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(result.layers), 3.5))
  ax.bar(range(len(result.layers)), result.changed)
  _layer_axis(ax, result.layers)
  ax.set_ylim(0, 1)
  ax.set_ylabel("top-1 expert changed")
  ax.set_title(f"{result.labels[0]} -> {result.labels[1]}")
  return finish(fig, path)


def capacity_sweep_plot(result: CapacitySweep,
                        path: Optional[str | Path] = None):
  """Accuracy and mean drop fraction against the eval capacity factor."""
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(result.factors, result.accuracy, "o-", label="token accuracy")
  ax.plot(result.factors, result.drop_fraction.mean(1), "s--",
          label="drop fraction (mean over layers)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("eval capacity factor")
  ax.set_ylim(0, 1)
  ax.legend()
  return finish(fig, path)
