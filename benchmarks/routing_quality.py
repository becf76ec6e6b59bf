"""Routing quality per router and balancing option, over seeds.

  PYTHONPATH=$PWD python benchmarks/routing_quality.py --quick

Each row's gin files (and bindings: the entries with "=") are layered on
gin/models/t5_1_1_tiny_moe.gin (8 experts, top-2); the task is copying a
Zipf-distributed token sequence (encoder input = decoder target). Every row
trains once per seed (the seed draws the initialization and the data; the
dropout key is fixed) and the table gives mean +- std over seeds (std with
ddof=1) of, over the last `--window` steps:

* final loss: the training cross entropy, mean over the window;
* load CV: std / mean of each sparse layer's per-expert load (tokens
  dispatched), mean over layers and steps;
* dropped: fraction of tokens no expert processed, mean over the window;
* dead experts: experts of all sparse layers together that received no
  token in the whole window (out of E x sparse layers).

The loss weights come from the gin files (e.g. aux_free.gin turns the
balancing loss off). One jitted step serves every seed of a row.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import gin
import jax
import numpy as np

from moe_jax import gin_utils
from moe_jax.models import build_model, configured_model_config
from moe_jax.train.objective import LossConfig
from moe_jax.train.optimizers import OptimizerConfig, make_optimizer
from moe_jax.train.step import init_state, make_train_step

MODEL = "gin/models/t5_1_1_tiny_moe.gin"
ROUTERS = {
    "top-1 (switch)": ("gin/routing/switch_top1.gin",),
    "top-2 (gshard)": ("gin/routing/gshard_top2.gin",),
    "expert choice": ("gin/routing/expert_choice.gin",),
    "noisy top-2": ("gin/routing/noisy_top_k.gin",),
    "hash (random)": ("gin/routing/hash.gin",),
    "BASE": ("gin/routing/base_layers.gin",),
    "DSelect-k (k=2)": ("gin/routing/dselect_k.gin",),
    "aux-loss-free top-2 rate 1e-3": ("gin/routing/aux_free.gin",),
    "aux-loss-free top-2 rate 1e-2": ("gin/routing/aux_free.gin",
                                      "BIAS_UPDATE_RATE = 1e-2"),
    "top-2 + 1 shared expert": ("gin/routing/gshard_top2.gin",
                                "gin/routing/shared_experts.gin"),
    "fine-grained 32 top-4": ("gin/routing/fine_grained.gin",),
}
COLUMNS = ("loss", "load_cv", "dropped", "dead")


@dataclasses.dataclass(frozen=True)
class Measured:
  """One training run's window statistics (see the module docstring)."""
  loss: float
  load_cv: float
  dropped: float
  dead: int
  expert_layers: int


def batches(vocab: int, batch: int, length: int, seed: int):
  rng = np.random.default_rng(seed)
  weights = 1.0 / np.arange(1, vocab - 1)
  while True:
    ids = rng.choice(vocab - 2, (batch, length), p=weights / weights.sum()) + 2
    ids = ids.astype(np.int32)
    shifted = np.concatenate([np.zeros((batch, 1), np.int32), ids[:, :-1]], 1)
    yield {"encoder_input_tokens": ids, "decoder_input_tokens": shifted,
           "decoder_target_tokens": ids}


def measure(losses: list[float], dropped: list[float],
            loads: list[np.ndarray]) -> Measured:
  """Window statistics of per-step cross entropies, drop fractions and
  <[R, E]> expert loads."""
  load = np.stack(loads)                                # [T, R, E]
  cv = load.std(-1) / np.maximum(load.mean(-1), 1e-9)
  return Measured(float(np.mean(losses)), float(cv.mean()),
                  float(np.mean(dropped)), int((load.sum(0) == 0).sum()),
                  int(load[0].size))


def run(spec: tuple[str, ...], seeds: list[int], steps: int, batch: int,
        length: int, window: int) -> list[Measured]:
  """Trains the model of `spec` (gin files and bindings) once per seed."""
  gin_utils.parse([MODEL, *[f for f in spec if "=" not in f]],
                  [b for b in spec if "=" in b])
  config = configured_model_config()
  loss_config = gin.get_configurable(LossConfig)()
  model = build_model(config)
  optimizer = make_optimizer(OptimizerConfig(
      name="adamw", learning_rate=3e-3, schedule="constant", warmup_steps=0))
  step = functools.partial(make_train_step(model, optimizer, loss_config),
                           dropout_key=jax.random.PRNGKey(0))
  out = []
  for seed in seeds:
    data = batches(config.vocab_size, batch, length, seed=seed)
    state = init_state(model, optimizer, next(data), jax.random.PRNGKey(seed))
    losses, dropped, loads = [], [], []
    for t in range(steps):
      state, metrics = step(state, next(data))
      if t >= steps - window:
        losses.append(float(metrics["cross_entropy"]))
        dropped.append(float(metrics["fraction_tokens_left_behind"]))
        loads.append(np.asarray(metrics["expert_load/per_layer"]))
    out.append(measure(losses, dropped, loads))
  return out


def row(name: str, runs: list[Measured]) -> str:
  cells = []
  for column, digits in zip(COLUMNS, (3, 3, 3, 1)):
    values = np.array([getattr(r, column) for r in runs], np.float64)
    cells.append(f"{values.mean():.{digits}f} +- "
                 f"{values.std(ddof=1):.{digits}f}")
  return (f"| {name} | " + " | ".join(cells) +
          f" / {runs[0].expert_layers} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="60 steps, batch 8, length 16, 3 seeds")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=32)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--window", type=int, default=10,
                      help="last steps the statistics are taken over")
  parser.add_argument("--rows", default=",".join(ROUTERS),
                      help="comma-separated row names (default: all)")
  args = parser.parse_args()
  if args.quick:
    args.steps, args.batch, args.length, args.seeds = 60, 8, 16, 3
  if args.seeds < 2 or not 0 < args.window <= args.steps:
    parser.error("--seeds must be >= 2 and 0 < --window <= --steps")
  print(f"model={MODEL} steps={args.steps} batch={args.batch} "
        f"length={args.length} seeds={args.seeds} window={args.window} "
        "optimizer=adamw lr=3e-3; mean +- std over seeds")
  print("| router / option | final loss | load CV | dropped | dead experts |")
  print("|---|---|---|---|---|")
  for name in args.rows.split(","):
    runs = run(ROUTERS[name], list(range(args.seeds)), args.steps,
               args.batch, args.length, args.window)
    print(row(name, runs), flush=True)


if __name__ == "__main__":
  main()
