"""MoE layer forward+backward time against a FLOP-matched dense FFN.

  python benchmarks/moe_layer.py [--quick] [--tokens 4096 --width 256
      --hidden 512 --experts 8 64 --k 1 2 --dtype bfloat16
      --grouped_matmul ragged_dot blocked] [--json r.json]

For each (E, k) the dense baseline is a gated-gelu FFN with d_ff = k * f, so
it does the same useful matmul work as k experts of width f per token. Every
variant is timed in the same run (median of --iters after a warm-up, the
variants' steps interleaved, one of each in turn), and the table gives
time, useful TFLOP/s (multiply-add = 2 FLOPs; forward+backward = 3x
forward), the ratio to dense, the fraction of tokens dropped, and the
temporary memory XLA reserves for the compiled step (its peak activation
footprint). The dropless path runs once per `--grouped_matmul` choice,
as variant `dropless/<choice>`; by default every implementation that runs
natively on this backend (not `megablox` off TPU, where Pallas interprets
it; not `tokamax` unless importable; not the E-times `dense` reference).
A benchmark, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import report
from moe_jax.moe.dispatch import PATHS, Dispatch
from moe_jax.moe.experts import Activation, Experts, expert_fns
from moe_jax.moe.grouped_matmul import GroupedMatmul, resolve
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import ExpertChoiceRouter, TokenChoiceRouter

GATED_MATMULS = 3  # wi_0, wi_1, wo


class DenseFFN(nn.Module):
  """A dense gated-gelu FFN <[1, T, D]> -> <[1, T, D]>: one expert."""
  hidden: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    weights = Experts(num_experts=1, hidden_dim=self.hidden,
                      activation=Activation.GATED_GELU, dtype=self.dtype,
                      name="experts")(x.shape[-1])
    return expert_fns(weights, Activation.GATED_GELU,
                      resolve(GroupedMatmul.RAGGED_DOT)).batched(x)


class Floor(nn.Module):
  """E experts on balanced buffers: <[1, T, D]> -> <[E, T k / E, D]>."""
  num_experts: int
  k: int
  hidden: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    weights = Experts(num_experts=self.num_experts, hidden_dim=self.hidden,
                      activation=Activation.GATED_GELU, dtype=self.dtype,
                      name="experts")(x.shape[-1])
    buffers = jnp.tile(x.reshape(-1, x.shape[-1]), (self.k, 1)).reshape(
        self.num_experts, -1, x.shape[-1])
    return expert_fns(weights, Activation.GATED_GELU,
                      resolve(GroupedMatmul.RAGGED_DOT)).batched(buffers)


def native_choices() -> list[str]:
  """The grouped matmuls that run natively on this backend (see above)."""
  skip = {GroupedMatmul.AUTO, GroupedMatmul.DENSE}
  if jax.default_backend() != "tpu":
    skip.add(GroupedMatmul.MEGABLOX)
  if importlib.util.find_spec("tokamax") is None:
    skip.add(GroupedMatmul.TOKAMAX)
  return [m.value for m in GroupedMatmul if m not in skip]


def _fwd_bwd(apply_fn):
  def loss(p, v):
    return jnp.mean(apply_fn(p, v).astype(jnp.float32) ** 2)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


class Variant(NamedTuple):
  """One row's compiled step: step(params, x) -> (loss, grads)."""
  name: str
  step: Callable
  params: Any
  dropped: float


def _temp_bytes(step, params, x) -> int | None:
  analysis = step.lower(params, x).compile().memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def _variants(args, experts: int, k: int, x, key) -> list[Variant]:
  """dense, floor, each dispatch path and grouped matmul for (E, k)."""
  dtype = jnp.dtype(args.dtype)
  flat = x.reshape(1, -1, args.width)
  dense = DenseFFN(k * args.hidden, dtype)
  floor = Floor(experts, k, args.hidden, dtype)
  variants = [
      Variant("dense", _fwd_bwd(lambda p, v: dense.apply(
          p, v.reshape(1, -1, v.shape[-1])).reshape(v.shape)),
              dense.init(key, flat), 0.0),
      Variant("floor", _fwd_bwd(lambda p, v: floor.apply(
          p, v.reshape(1, -1, v.shape[-1]))), floor.init(key, flat), 0.0)]
  token_choice = TokenChoiceRouter(num_selected_experts=k)
  layers = [(path.value, token_choice, path, GroupedMatmul.RAGGED_DOT)
            for path in PATHS if path != Dispatch.DROPLESS]
  layers += [(f"dropless/{matmul}", token_choice, Dispatch.DROPLESS,
              GroupedMatmul(matmul)) for matmul in args.grouped_matmul]
  if k == 1:
    layers.append(("expert_choice/scatter", ExpertChoiceRouter(),
                   Dispatch.SCATTER, GroupedMatmul.RAGGED_DOT))
  for name, router, path, matmul in layers:
    layer = MoeLayer(num_experts=experts, expert_hidden_dim=args.hidden,
                     router=router, dispatch=path, grouped_matmul=matmul,
                     eval_capacity_factor=args.capacity_factor,
                     max_group_size=args.group_size, dtype=dtype)
    params = layer.init(key, x, deterministic=True)
    _, stats = jax.jit(lambda p, v, layer=layer: layer.apply(
        p, v, deterministic=True))(params, x)
    step = _fwd_bwd(lambda p, v, layer=layer: layer.apply(
        p, v, deterministic=True)[0])
    variants.append(Variant(name, step, params,
                            float(stats.fraction_tokens_left_behind)))
  return variants


def run(args) -> list[dict]:
  key_x, key_p = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(key_x, (args.batch, args.tokens // args.batch,
                                args.width), jnp.dtype(args.dtype))
  rows = []
  for experts in args.experts:
    for k in args.k:
      useful = (3 * 2 * GATED_MATMULS * args.tokens * args.width
                * args.hidden * k)
      variants = _variants(args, experts, k, x, key_p)
      times = report.median_seconds(
          [lambda v=v: jax.block_until_ready(v.step(v.params, x))
           for v in variants], args.iters)
      for v, seconds in zip(variants, times):
        rows.append(dict(
            experts=experts, k=k, variant=v.name, time_ms=1e3 * seconds,
            tflops=useful / seconds / 1e12, ratio=seconds / times[0],
            dropped=v.dropped,
            temp_mib=_mib(_temp_bytes(v.step, v.params, x))))
  return rows


def _mib(num_bytes: int | None) -> float | None:
  return None if num_bytes is None else num_bytes / 2**20


def print_table(rows: list[dict]) -> None:
  print(f"{'E':>3} {'k':>2} {'variant':<24} {'ms':>9} {'TFLOP/s':>8} "
        f"{'x dense':>8} {'dropped':>8} {'temp MiB':>9}")
  for r in rows:
    temp = "n/a" if r["temp_mib"] is None else f"{r['temp_mib']:.1f}"
    print(f"{r['experts']:>3} {r['k']:>2} {r['variant']:<24} "
          f"{r['time_ms']:9.2f} {r['tflops']:8.3f} {r['ratio']:8.2f} "
          f"{r['dropped']:8.3f} {temp:>9}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
  parser.add_argument("--k", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--group_size", type=int, default=4096)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--grouped_matmul", nargs="+", default=None,
                      choices=[m.value for m in GroupedMatmul],
                      help="grouped matmuls to time on the dropless path "
                      "(default: those native to this backend)")
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, for checking that the script runs")
  parser.add_argument("--json", default=None, help="write the rows as JSON")
  args = parser.parse_args()
  args.grouped_matmul = args.grouped_matmul or native_choices()
  if args.quick:
    args.tokens, args.width, args.hidden, args.iters = 512, 64, 128, 2
    args.experts = [8]
  print(f"{report.machine()}  "
        f"tokens {args.tokens}  d {args.width}  f {args.hidden}  "
        f"capacity factor {args.capacity_factor}  {args.dtype}")
  rows = run(args)
  print_table(rows)
  report.write_json(args.json, args, rows)


if __name__ == "__main__":
  main()
