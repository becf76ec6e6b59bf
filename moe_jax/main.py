"""Command line entry point: `python -m moe_jax.main COMMAND`.

  python -m moe_jax.main train --gin_file=gin/runs/mini_flan_cpu.gin \
      [--gin_file=...] [--gin.KEY=VALUE ...] [--distributed=none|auto|env]

Commands:
  train  train (resuming from MODEL_DIR), evaluate, print a summary.
  eval   evaluate the latest checkpoint of MODEL_DIR on EVAL_MIXTURE.
  infer  greedy predictions of the latest checkpoint, as JSONL, for a task
         split (--task), a .jsonl file (field "inputs") or a text file
         (--input_file); written to --output.
  demo   route a random batch through an MoE layer on every dispatch path and
         print the routing statistics (runs on CPU in seconds).
"""

from __future__ import annotations

import argparse
import sys

import gin
import jax
import numpy as np

from moe_jax import distributed, gin_utils
from moe_jax.moe.dispatch import PATHS, Dispatch
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import ExpertChoiceRouter, TokenChoiceRouter


def _demo_routers() -> dict[str, object]:
  return {
      "switch_top1": TokenChoiceRouter(num_selected_experts=1),
      "gshard_top2": TokenChoiceRouter(num_selected_experts=2,
                                       renormalize_gates=True),
      "expert_choice": ExpertChoiceRouter(),
  }


def demo(args: argparse.Namespace) -> None:
  """Prints routing statistics of every router x dispatch path."""
  key_x, key_init = jax.random.split(jax.random.PRNGKey(args.seed))
  x = jax.random.normal(key_x, (args.batch, args.length, args.width))
  print(f"MoE layer demo: x[{args.batch}, {args.length}, {args.width}], "
        f"{args.experts} experts, capacity factor {args.capacity_factor}")
  header = (f"{'router':<14} {'dispatch':<9} {'aux':>6} {'z':>6} "
            f"{'dropped':>8} {'conf':>6} {'usage':>6}  load per expert")
  print(header)
  for name, router in _demo_routers().items():
    params = None
    for path in PATHS:
      if path == Dispatch.DROPLESS and not router.supports_dropless:
        continue
      layer = MoeLayer(
          num_experts=args.experts, expert_hidden_dim=4 * args.width,
          router=router, dispatch=path,
          train_capacity_factor=args.capacity_factor,
          eval_capacity_factor=args.capacity_factor)
      if params is None:  # one set of weights for every path
        params = layer.init(key_init, x, deterministic=True)
      _, stats = jax.jit(lambda p, v, layer=layer: layer.apply(
          p, v, deterministic=True))(params, x)
      load = np.asarray(stats.expert_load).astype(int).tolist()
      print(f"{name:<14} {path.value:<9} {float(stats.auxiliary_loss):6.3f} "
            f"{float(stats.router_z_loss):6.3f} "
            f"{float(stats.fraction_tokens_left_behind):8.3f} "
            f"{float(stats.router_confidence):6.3f} "
            f"{float(stats.expert_usage):6.3f}  {load}")


def _configured(args: argparse.Namespace, bindings: list[str]):
  """Starts the process group, registers the tasks, parses gin."""
  distributed.initialize(args.distributed)
  # Before parsing: the task modules define gin knobs (vocabulary, data
  # directory) that they read only when a dataset is built.
  import tasks  # noqa: F401  (registers the SeqIO tasks and mixtures)
  gin_utils.parse(args.gin_file, bindings)
  gin_utils.check_macros_used(bindings, gin.config_str())
  from moe_jax.train import run
  return run.configured_run()


def _baselines(configured) -> dict[str, dict[str, float]] | None:
  """The constant-answer baseline of the run's eval tasks (None without
  an evaluation)."""
  cfg = configured.eval
  if cfg is None or not cfg.mixture_or_task_name:
    return None
  from moe_jax.train import baseline
  return baseline.constant_answer_scores(
      cfg.mixture_or_task_name, cfg.split, cfg.task_feature_lengths,
      cfg.num_examples)


def train(args: argparse.Namespace, bindings: list[str]) -> None:
  """Trains the configured run and prints a summary. A run stopped by a
  signal exits with 128 + its number (143 for SIGTERM), as if killed by
  it, so a scheduler tells preemption from completion."""
  from moe_jax.train import run as run_lib
  from moe_jax.train import summary
  configured = _configured(args, bindings)
  result = run_lib.train(configured)
  if jax.process_index() == 0:
    print(summary.format_summary(configured, result, _baselines(configured)))
  if result.loop.stop_signal is not None:
    sys.exit(128 + result.loop.stop_signal)


def evaluate(args: argparse.Namespace, bindings: list[str]) -> None:
  """Evaluates the latest checkpoint of MODEL_DIR on EVAL_CONFIG."""
  from moe_jax.train import checkpoints
  from moe_jax.train.evaluation import Evaluator
  configured = _configured(args, bindings)
  if configured.eval is None:
    raise ValueError("EVAL_CONFIG is not set: bind it (gin/runs/train.gin) "
                     "and EVAL_MIXTURE")
  step = checkpoints.resolve_step(configured.train.model_dir)
  params = checkpoints.restore_params(configured.train.model_dir, step)
  model_state = checkpoints.restore_model_state(configured.train.model_dir,
                                                step)
  evaluator = Evaluator(configured.eval, configured.model,
                        configured.data.objective, configured.train.model_dir,
                        configured.train.tensorboard)
  for task, values in evaluator.evaluate(params, step,
                                                  model_state).items():
    print(f"{task}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))


def infer(args: argparse.Namespace, bindings: list[str]) -> None:
  """Writes greedy predictions of the latest checkpoint as JSONL."""
  import seqio
  from moe_jax import infer as infer_lib
  from moe_jax.train import checkpoints
  from moe_jax.train.evaluation import ModelFns
  if (args.task is None) == (args.input_file is None):
    raise ValueError("give exactly one of --task and --input_file")
  configured = _configured(args, bindings)
  lengths = configured.data.task_feature_lengths
  if args.task is not None:
    records = infer_lib.task_inputs(args.task, args.split, args.num_examples)
    source = args.task
  else:
    records = infer_lib.read_inputs(args.input_file)
    source = configured.data.mixture_or_task_name
  vocabulary = seqio.get_mixture_or_task(source).output_features[
      "targets"].vocabulary
  fns = ModelFns(configured.model, configured.data.objective,
                 lengths["targets"], eos_id=vocabulary.eos_id)
  step = checkpoints.resolve_step(configured.train.model_dir)
  params = checkpoints.restore_params(configured.train.model_dir, step)
  predictions = infer_lib.predict(
      fns, params, vocabulary, records, lengths["inputs"], args.batch_size,
      checkpoints.restore_model_state(configured.train.model_dir, step))
  infer_lib.write_jsonl(predictions, args.output)
  print(f"wrote {len(predictions)} predictions to {args.output}")


def main(argv: list[str] | None = None) -> None:
  bindings, rest = gin_utils.split_gin_flags(
      sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(prog="python -m moe_jax.main")
  commands = parser.add_subparsers(dest="command", required=True)
  for name, fn in (("train", train), ("eval", evaluate), ("infer", infer)):
    sub = commands.add_parser(name, help=fn.__doc__)
    sub.add_argument("--gin_file", action="append", default=[])
    sub.add_argument("--distributed", default="none",
                     help="none | auto | env (see moe_jax/distributed.py)")
    if name == "infer":
      sub.add_argument("--task", default=None)
      sub.add_argument("--split", default="validation")
      sub.add_argument("--num_examples", type=int, default=None)
      sub.add_argument("--input_file", default=None)
      sub.add_argument("--output", required=True)
      sub.add_argument("--batch_size", type=int, default=32)
  demo_parser = commands.add_parser("demo", help=demo.__doc__)
  demo_parser.add_argument("--batch", type=int, default=4)
  demo_parser.add_argument("--length", type=int, default=64)
  demo_parser.add_argument("--width", type=int, default=32)
  demo_parser.add_argument("--experts", type=int, default=8)
  demo_parser.add_argument("--capacity_factor", type=float, default=1.0)
  demo_parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(rest)
  if args.command == "demo":
    demo(args)
  else:
    {"train": train, "eval": evaluate, "infer": infer}[args.command](
        args, bindings)


if __name__ == "__main__":
  main()
