"""A sparse T5 training step against the FLOP-matched dense T5 step.

  python benchmarks/t5_step.py [--quick] [--batch 8 --length 128
      --width 256 --hidden 1024 --layers 4 --experts 8 --k 2
      --dispatch dropless scatter --grouped_matmul blocked] [--json r.json]

One jitted train step (forward, backward, Adafactor update) of a T5
encoder-decoder of `--layers` encoder and decoder layers, every other FFN
sparse (`MoeConfig.sparse_every = 2`). The dense model's FFNs have width
`--hidden` (F); each expert has width F / k, so a token's k experts do the
dense FFN's matmul work and the sparse step differs from the dense one by
routing, dispatch and the grouped matmul alone. Every variant is timed in
the same run (median of --iters after a warm-up, the variants' steps
interleaved, one of each in turn); the table gives time, the ratio to
dense and the temporary memory XLA reserves for the step. A benchmark,
not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import functools
from typing import Callable

import jax
import numpy as np

import report
from moe_jax.models import MoeConfig, TransformerConfig, build_model
from moe_jax.moe.dispatch import Dispatch
from moe_jax.moe.grouped_matmul import GroupedMatmul
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter
from moe_jax.train import objective, optimizers, step as train_step


def model_config(args, moe: MoeConfig | None) -> TransformerConfig:
  return TransformerConfig(
      vocab_size=args.vocab, emb_dim=args.width, num_heads=args.width // 64,
      head_dim=64, mlp_dim=args.hidden, num_encoder_layers=args.layers,
      num_decoder_layers=args.layers, encoder_moe=moe, decoder_moe=moe)


def sparse_layer(args, dispatch: str, matmul: str) -> MoeConfig:
  return MoeConfig(layer=MoeLayer(
      router=TokenChoiceRouter(num_selected_experts=args.k),
      num_experts=args.experts, expert_hidden_dim=args.hidden // args.k,
      dispatch=Dispatch(dispatch), grouped_matmul=GroupedMatmul(matmul),
      train_capacity_factor=args.capacity_factor))


def batch(args) -> dict[str, np.ndarray]:
  """Random tokens <int32>[B, L], every position real."""
  rng = np.random.default_rng(0)
  tokens = lambda: rng.integers(2, args.vocab, (args.batch, args.length),
                                dtype=np.int32)
  targets = tokens()
  return {"encoder_input_tokens": tokens(),
          "decoder_input_tokens": np.concatenate(
              [np.zeros((args.batch, 1), np.int32), targets[:, :-1]], 1),
          "decoder_target_tokens": targets,
          "decoder_loss_weights": np.ones(targets.shape, np.float32)}


def prepared_step(config: TransformerConfig, data
                  ) -> tuple[Callable[[], None], float | None]:
  """(a call that runs one train step on its own state and blocks, the
  temporary MiB of the compiled step)."""
  model = build_model(config)
  optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig())
  state = train_step.init_state(model, optimizer, data, jax.random.PRNGKey(0))
  jitted = train_step.make_train_step(model, optimizer, objective.LossConfig())
  key = jax.random.PRNGKey(1)
  analysis = jitted.lower(state, data, key).compile().memory_analysis()
  step = functools.partial(jitted, dropout_key=key)

  def call():
    nonlocal state
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)

  temp = None if analysis is None else analysis.temp_size_in_bytes / 2**20
  return call, temp


def run(args) -> list[dict]:
  data = batch(args)
  variants = [("dense", model_config(args, None))]
  for dispatch in args.dispatch:
    matmuls = args.grouped_matmul if dispatch == "dropless" else ["auto"]
    for matmul in matmuls:
      name = f"{dispatch}/{matmul}" if dispatch == "dropless" else dispatch
      variants.append((name, model_config(
          args, sparse_layer(args, dispatch, matmul))))
  steps = [prepared_step(config, data) for _, config in variants]
  times = report.median_seconds([call for call, _ in steps], args.iters)
  return [dict(variant=name, time_ms=1e3 * seconds,
               ratio=seconds / times[0], temp_mib=temp)
          for (name, _), (_, temp), seconds in zip(variants, steps, times)]


def print_table(rows: list[dict]) -> None:
  print(f"{'variant':<20} {'ms':>9} {'x dense':>8} {'temp MiB':>9}")
  for r in rows:
    temp = "n/a" if r["temp_mib"] is None else f"{r['temp_mib']:.1f}"
    print(f"{r['variant']:<20} {r['time_ms']:9.1f} {r['ratio']:8.2f} "
          f"{temp:>9}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--k", type=int, default=2)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--dispatch", nargs="+", default=["dropless"],
                      choices=[d.value for d in Dispatch])
  parser.add_argument("--grouped_matmul", nargs="+", default=["auto"],
                      choices=[m.value for m in GroupedMatmul])
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, for checking that the script runs")
  parser.add_argument("--json", default=None, help="write the rows as JSON")
  args = parser.parse_args()
  if args.quick:
    args.batch, args.length, args.width, args.hidden = 2, 16, 64, 128
    args.layers, args.vocab, args.iters = 2, 128, 2
  print(f"{report.machine()}  "
        f"batch {args.batch}  length {args.length}  d {args.width}  "
        f"F {args.hidden}  layers {args.layers}+{args.layers}  "
        f"E {args.experts}  k {args.k}")
  rows = run(args)
  print_table(rows)
  report.write_json(args.json, args, rows)


if __name__ == "__main__":
  main()
