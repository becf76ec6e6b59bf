"""Matplotlib figures of a `RoutingReport` (Agg backend: no display needed).

Every function returns the figure and, given `path`, also saves it as PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from moe_jax.inspection.routing_report import DROPPED, RoutingReport


def finish(fig, path: Optional[str | Path]):
  """Lays `fig` out, saves it as PNG at `path` (if given), returns it."""
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, format="png", dpi=100)
  return fig


def load_heatmap(report: RoutingReport, path: Optional[str | Path] = None):
  """Layer x expert heatmap of the fraction of each layer's dispatched
  tokens that went to each expert."""
  load = report.load_matrix()
  share = load / np.maximum(load.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(1 + 0.5 * load.shape[1],
                                  1 + 0.4 * load.shape[0]))
  image = ax.imshow(share, cmap="viridis", aspect="auto", vmin=0)
  ax.set_xticks(range(load.shape[1]))
  ax.set_yticks(range(load.shape[0]), report.layer_names())
  ax.set_xlabel("expert")
  ax.set_title("share of dispatched tokens")
  fig.colorbar(image, ax=ax)
  return finish(fig, path)


def expert_id_map(report: RoutingReport, stack: str, example: int = 0,
                  path: Optional[str | Path] = None):
  """Token x layer map of the expert that processed each token (white:
  left behind, no expert processed it)."""
  tokens, layers, table = report.expert_id_table(stack, example)
  masked = np.ma.masked_equal(table, DROPPED)
  cmap = plt.get_cmap("tab20", report.num_experts).with_extremes(bad="white")
  fig, ax = plt.subplots(figsize=(2 + 0.6 * len(layers),
                                  1 + 0.22 * len(tokens)))
  image = ax.imshow(masked, cmap=cmap, aspect="auto", vmin=-0.5,
                    vmax=report.num_experts - 0.5, interpolation="nearest")
  ax.set_yticks(range(len(tokens)), [repr(t) for t in tokens], fontsize=7)
  ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right")
  ax.set_title(f"{stack} expert per token (example {example})")
  fig.colorbar(image, ax=ax, ticks=range(report.num_experts), label="expert")
  return finish(fig, path)


def fraction_left_behind(report: RoutingReport,
                         path: Optional[str | Path] = None):
  """Bar chart of each layer's `fraction_tokens_left_behind`: the fraction
  of real tokens no expert processed."""
  names = report.layer_names()
  fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 3))
  ax.bar(range(len(names)),
         [l.fraction_tokens_left_behind for l in report.layers])
  ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
  ax.set_ylabel("fraction of tokens left behind")
  ax.set_ylim(0, 1)
  return finish(fig, path)
