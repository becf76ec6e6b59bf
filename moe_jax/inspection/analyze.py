"""Runs the routing analyses on a model directory; writes a CSV table and a
PNG per analysis.

  python -m moe_jax.inspection.analyze MODEL_DIR --examples EXAMPLES.jsonl \
      --out OUT_DIR [--step N] [--compare_dir DIR] [--compare_step N] \
      [--capacity_factors 0.5,1,2,4]
  python -m moe_jax.inspection.analyze MODEL_DIR --mixture NAME --out OUT_DIR \
      [--split validation] [--examples_per_task 32] \
      [--feature_lengths inputs=128,targets=64] [--module my.tasks] ...

EXAMPLES.jsonl holds one example a line: {"task": ..., "inputs": ...,
"targets": ...} ("task" names a task or a task cluster; "targets" is
optional). Text is encoded with seqio's ByteVocabulary. --mixture names a
registered SeqIO mixture (or task) instead: the analyses route the first
--examples_per_task examples of each of its tasks (`task_batches`; the
project's `tasks` package is imported, and every --module, to register
them). Writes, under OUT_DIR: utilization.{csv,png} (per task),
drops.{csv,png} and dropped_tokens.csv (all examples),
capacity_sweep.{csv,png}, and, given --compare_dir or --compare_step,
routing_change.{csv,png} (that checkpoint before MODEL_DIR's).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence


from moe_jax.inspection import analyses, analysis_plots, task_batches
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


@dataclasses.dataclass(frozen=True)
class Examples:
  """What the analyses route.

  Attributes:
    per_task: task (or cluster) -> its model features.
    every: every example's features in one batch.
    vocabulary: shows the batches' tokens as text.
  """
  per_task: Mapping[str, analyses.Batch]
  every: analyses.Batch
  vocabulary: Vocabulary


def _batch(checkpoint: Checkpoint, examples: Sequence[dict[str, str]],
           vocabulary: Vocabulary):
  targets = [e.get("targets", e["inputs"]) for e in examples]
  return text_batch(checkpoint, [e["inputs"] for e in examples], targets,
                    vocabulary)


def jsonl_examples(checkpoint: Checkpoint, path: str | Path,
                   vocabulary: Optional[Vocabulary] = None) -> Examples:
  """The examples of a JSONL file (`read_examples`), encoded with
  `vocabulary` (default ByteVocabulary)."""
  vocabulary = vocabulary or default_vocabulary()
  examples = read_examples(path)
  every = [e for task in examples.values() for e in task]
  return Examples({task: _batch(checkpoint, task_examples, vocabulary)
                   for task, task_examples in examples.items()},
                  _batch(checkpoint, every, vocabulary), vocabulary)


def mixture_examples(checkpoint: Checkpoint, mixture_or_task_name: str,
                     **kwargs) -> Examples:
  """The first examples of each task of a registered SeqIO mixture;
  `kwargs` as `task_batches.task_batches`."""
  per_task = task_batches.task_batches(checkpoint, mixture_or_task_name,
                                       **kwargs)
  return Examples(per_task, task_batches.joined(per_task),
                  task_batches.task_vocabulary(mixture_or_task_name))


def run(model_dir: str, out_dir: str, examples_path: Optional[str] = None,
        mixture: Optional[str] = None, step: Optional[int] = None,
        compare_dir: Optional[str] = None,
        compare_step: Optional[int] = None,
        capacity_factors: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
        vocabulary: Optional[Vocabulary] = None,
        **mixture_options) -> list[Path]:
  """Writes the analyses' tables and PNGs of the examples of
  `examples_path` (JSONL) or of `mixture` (`mixture_options` as
  `task_batches.task_batches`); returns the paths written.

  Raises:
    ValueError: not exactly one of `examples_path` and `mixture` given.
  """
  if (examples_path is None) == (mixture is None):
    raise ValueError("give the examples as exactly one of --examples "
                     f"(got {examples_path!r}) and --mixture (got "
                     f"{mixture!r})")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  before = None
  if compare_dir is not None or compare_step is not None:
    before = open_checkpoint(compare_dir or model_dir, compare_step)
  checkpoint = open_checkpoint(model_dir, step)  # its gin config stays
  examples = (jsonl_examples(checkpoint, examples_path, vocabulary)
              if mixture is None else
              mixture_examples(checkpoint, mixture, **mixture_options))
  batch = examples.every
  written = []

  def save(name, rows, result, draw):
    written.append(write_table(rows, out / f"{name}.csv"))
    if draw is not None:
      written.append(out / f"{name}.png")
      draw(result, path=written[-1])

  usage = analyses.utilization(checkpoint, examples.per_task)
  save("utilization", usage.rows(), usage, analysis_plots.utilization_heatmap)
  dropped = analyses.drops(route_batch(checkpoint, batch,
                                       examples.vocabulary))
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


def feature_lengths(text: str) -> dict[str, int]:
  """'inputs=128,targets=64' -> {"inputs": 128, "targets": 64}.

  Raises:
    ValueError: an entry is not NAME=INTEGER.
  """
  out = {}
  for entry in text.split(","):
    name, _, value = entry.partition("=")
    if not name.strip() or not value.strip().isdigit():
      raise ValueError(f"--feature_lengths: expected NAME=INTEGER entries "
                       f"like inputs=128,targets=64; got {entry!r}")
    out[name.strip()] = int(value)
  return out


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      description="FLAN-MoE routing analyses of a model directory.")
  parser.add_argument("model_dir")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--examples",
                      help="JSONL, one {task, inputs, targets} a line")
  source.add_argument("--mixture",
                      help="a registered SeqIO mixture or task: utilization "
                           "per task of it")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--split", default="validation",
                      help="the mixture's split")
  parser.add_argument("--examples_per_task", type=int, default=32,
                      help="examples routed per task of the mixture")
  parser.add_argument("--feature_lengths",
                      default="inputs={inputs},targets={targets}".format(
                          **task_batches.DEFAULT_FEATURE_LENGTHS),
                      help="the mixture's task feature lengths")
  parser.add_argument("--module", action="append", default=[],
                      help="a module to import that registers the mixture "
                           "(repeatable; the project's tasks are imported)")
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
  options = {}
  if args.mixture is not None:
    import tasks  # noqa: F401  (registers the project's tasks, mixtures)
    for module in args.module:
      importlib.import_module(module)
    options = {"split": args.split,
               "examples_per_task": args.examples_per_task,
               "task_feature_lengths": feature_lengths(args.feature_lengths)}
  for path in run(args.model_dir, args.out, args.examples, args.mixture,
                  args.step, args.compare_dir, args.compare_step, factors,
                  **options):
    print(path)


if __name__ == "__main__":
  main()
