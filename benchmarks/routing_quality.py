"""Routing quality: a tiny sparse T5 trained on generated data per router.

  PYTHONPATH=$PWD python benchmarks/routing_quality.py --quick

Each router's gin file is layered on gin/models/t5_1_1_tiny_moe.gin; the
task is copying a Zipf-distributed token sequence (encoder input = decoder
target). Prints, per router: final training loss (cross entropy, mean of the
last 5 steps), max/mean and coefficient of variation of the expert load of
the sparse layers (one training-mode batch after training, summed over
layers), fraction of tokens dropped (mean over steps) and mean step time
(after the first, compiling, step).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from moe_jax import gin_utils
from moe_jax.models import build_model, configured_model_config
from moe_jax.train.objective import LossConfig
from moe_jax.train.optimizers import OptimizerConfig, make_optimizer
from moe_jax.train.step import (init_state, make_train_step, model_inputs,
                                 model_variables)

MODEL = "gin/models/t5_1_1_tiny_moe.gin"
ROUTERS = {
    "top-1 (switch)": "gin/routing/switch_top1.gin",
    "top-2 (gshard)": "gin/routing/gshard_top2.gin",
    "expert choice": "gin/routing/expert_choice.gin",
    "noisy top-2": "gin/routing/noisy_top_k.gin",
    "hash (random)": "gin/routing/hash.gin",
    "BASE": "gin/routing/base_layers.gin",
    "DSelect-k (k=2)": "gin/routing/dselect_k.gin",
}


def batches(vocab: int, batch: int, length: int, seed: int):
  rng = np.random.default_rng(seed)
  weights = 1.0 / np.arange(1, vocab - 1)
  while True:
    ids = rng.choice(vocab - 2, (batch, length), p=weights / weights.sum()) + 2
    ids = ids.astype(np.int32)
    shifted = np.concatenate([np.zeros((batch, 1), np.int32), ids[:, :-1]], 1)
    yield {"encoder_input_tokens": ids, "decoder_input_tokens": shifted,
           "decoder_target_tokens": ids}


def run(routing_file: str, steps: int, batch: int, length: int) -> dict:
  gin_utils.parse([MODEL, routing_file])
  config = configured_model_config()
  model = build_model(config)
  optimizer = make_optimizer(OptimizerConfig(
      name="adamw", learning_rate=3e-3, schedule="constant", warmup_steps=0))
  data = batches(config.vocab_size, batch, length, seed=0)
  state = init_state(model, optimizer, next(data), jax.random.PRNGKey(0))
  step = make_train_step(model, optimizer, LossConfig(), jax.random.PRNGKey(1))
  losses, dropped, times = [], [], []
  for _ in range(steps):
    b = next(data)
    start = time.perf_counter()
    state, metrics = step(state, b)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - start)
    losses.append(float(metrics["cross_entropy"]))
    dropped.append(float(metrics["fraction_tokens_left_behind"]))
  out = model.apply(model_variables(state.params, state.model_state),
                    **model_inputs(next(data)),
                    enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(2)})
  load = np.asarray(out.moe_stats.expert_load).reshape(
      -1, out.moe_stats.expert_load.shape[-1])
  per_layer_ratio = load.max(-1) / load.mean(-1)
  per_layer_cv = load.std(-1) / load.mean(-1)
  return {"loss": np.mean(losses[-5:]), "max/mean": per_layer_ratio.mean(),
          "cv": per_layer_cv.mean(), "dropped": np.mean(dropped),
          "ms/step": 1e3 * np.mean(times[1:])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="30 steps, batch 8, length 16 (about a minute)")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=32)
  args = parser.parse_args()
  if args.quick:
    args.steps, args.batch, args.length = 30, 8, 16
  print(f"model={MODEL} steps={args.steps} batch={args.batch} "
        f"length={args.length} optimizer=adamw lr=3e-3")
  print("| router | final loss | max/mean load | CV of load | dropped | "
        "ms/step |")
  print("|---|---|---|---|---|---|")
  for name, path in ROUTERS.items():
    r = run(path, args.steps, args.batch, args.length)
    print(f"| {name} | {r['loss']:.3f} | {r['max/mean']:.2f} | {r['cv']:.2f} "
          f"| {r['dropped']:.3f} | {r['ms/step']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
