"""Runs the routing analyses on a model directory; writes a CSV table and a
PNG per analysis.

  python -m moe_jax.inspection.analyze MODEL_DIR --examples EXAMPLES.jsonl \
      --out OUT_DIR [--step N] [--compare_dir DIR] [--compare_step N] \
      [--capacity_factors 0.5,1,2,4]

EXAMPLES.jsonl holds one example a line: {"task": ..., "inputs": ...,
"targets": ...} ("task" names a task or a task cluster; "targets" is
optional). Text is encoded with seqio's ByteVocabulary. Writes, under
OUT_DIR: utilization.{csv,png} (per task), drops.{csv,png} and
dropped_tokens.csv (all examples), capacity_sweep.{csv,png}, and, given
--compare_dir or --compare_step, routing_change.{csv,png} (that checkpoint
before MODEL_DIR's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from moe_jax.inspection import analyses, analysis_plots
from moe_jax.inspection.checkpoint import Checkpoint, open_checkpoint
from moe_jax.inspection.routing_report import (default_vocabulary,
                                               route_batch, text_batch)
from moe_jax.inspection.tables import write_table
from moe_jax.text import Vocabulary


def read_examples(path: str | Path) -> dict[str, list[dict[str, str]]]:
  """task -> its examples ({"inputs", "targets"?}), in file order.

  Raises:
    ValueError: a line is not a JSON object with "task" and "inputs".
  """
  out: dict[str, list[dict[str, str]]] = {}
  for number, line in enumerate(Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    record = json.loads(line)
    if not isinstance(record, dict) or not {"task", "inputs"} <= set(record):
      raise ValueError(f"{path}:{number}: expected a JSON object with "
                       f"'task' and 'inputs'; got {line[:80]!r}")
    out.setdefault(record["task"], []).append(record)
  if not out:
    raise ValueError(f"{path} holds no example")
  return out


def _batch(checkpoint: Checkpoint, examples: Sequence[dict[str, str]],
           vocabulary: Vocabulary):
  targets = [e.get("targets", e["inputs"]) for e in examples]
  return text_batch(checkpoint, [e["inputs"] for e in examples], targets,
                    vocabulary)


def run(model_dir: str, examples_path: str, out_dir: str,
        step: Optional[int] = None, compare_dir: Optional[str] = None,
        compare_step: Optional[int] = None,
        capacity_factors: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
        vocabulary: Optional[Vocabulary] = None) -> list[Path]:
  """Writes the analyses' tables and PNGs; returns the paths written."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  vocabulary = vocabulary or default_vocabulary()
  examples = read_examples(examples_path)
  every = [e for task in examples.values() for e in task]
  before = None
  if compare_dir is not None or compare_step is not None:
    before = open_checkpoint(compare_dir or model_dir, compare_step)
  checkpoint = open_checkpoint(model_dir, step)  # its gin config stays
  batch = _batch(checkpoint, every, vocabulary)
  written = []

  def save(name, rows, result, draw):
    written.append(write_table(rows, out / f"{name}.csv"))
    if draw is not None:
      written.append(out / f"{name}.png")
      draw(result, path=written[-1])

  usage = analyses.utilization(checkpoint, {
      task: _batch(checkpoint, task_examples, vocabulary)
      for task, task_examples in examples.items()})
  save("utilization", usage.rows(), usage, analysis_plots.utilization_heatmap)
  dropped = analyses.drops(route_batch(checkpoint, batch, vocabulary))
  save("drops", dropped.rows(), dropped, analysis_plots.drop_bars)
  if dropped.tokens:
    save("dropped_tokens", dropped.token_rows(), dropped, None)
  sweep = analyses.capacity_sweep(checkpoint, batch, capacity_factors)
  save("capacity_sweep", sweep.rows(), sweep,
       analysis_plots.capacity_sweep_plot)
  if before is not None:
    change = analyses.compare_checkpoints(before, checkpoint, batch)
    save("routing_change", change.rows(), change,
         analysis_plots.routing_change_bars)
  return written


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      description="FLAN-MoE routing analyses of a model directory.")
  parser.add_argument("model_dir")
  parser.add_argument("--examples", required=True,
                      help="JSONL, one {task, inputs, targets} a line")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the latest)")
  parser.add_argument("--compare_dir", default=None,
                      help="model directory of the checkpoint to compare "
                           "against (default: MODEL_DIR)")
  parser.add_argument("--compare_step", type=int, default=None,
                      help="its step (default: its latest)")
  parser.add_argument("--capacity_factors", default="0.5,1,2,4",
                      help="comma-separated eval capacity factors")
  args = parser.parse_args(argv)
  factors = [float(f) for f in args.capacity_factors.split(",")]
  for path in run(args.model_dir, args.examples, args.out, args.step,
                  args.compare_dir, args.compare_step, factors):
    print(path)


if __name__ == "__main__":
  main()
