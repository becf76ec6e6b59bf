"""What a chunk of H rows costs per row in `blocked`'s loop of dots.

  python benchmarks/chunk_dots.py [--rows 2048 --width 256 --hidden 512
      --experts 8 --heights 256 128 64 32 16 8]

The forward product <[M, I]> @ <[E, I, O]> of M rows in E equal groups,
three ways: one dense <[M, I]> @ <[I, O]> dot (no groups: the speed of
one big dot), XLA's batched dot over <[E, M / E, I]> buffers (the layer
benchmark's `floor`), and for each H a loop over the rows in chunks of H,
each one <[H, I]> @ <[I, O]> dot sliced from the rows and written back in
place, as `moe_jax.moe.kernels.blocked` walks a group. Median of --iters,
the variants interleaved; the ratio is to the batched dot. A benchmark,
not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import report


def chunk_loop(height: int, num_groups: int):
  """rows <[M, I]>, w <[E, I, O]> -> <[M, O]> in chunks of `height` rows."""

  def product(rows, w):
    group_rows = rows.shape[0] // num_groups

    def chunk(j, out):
      at = j * height
      part = (jax.lax.dynamic_slice_in_dim(rows, at, height)
              @ w[at // group_rows])
      return jax.lax.dynamic_update_slice_in_dim(out, part, at, 0)

    return jax.lax.fori_loop(0, rows.shape[0] // height, chunk,
                             jnp.zeros((rows.shape[0], w.shape[2]), w.dtype))
  return jax.jit(product)


def run(args) -> list[dict]:
  key_x, key_w = jax.random.split(jax.random.PRNGKey(0))
  rows = jax.random.normal(key_x, (args.rows, args.width))
  w = jax.random.normal(key_w, (args.experts, args.width, args.hidden))
  group_rows = args.rows // args.experts
  variants = {
      "dense": jax.jit(lambda r, w: r @ w[0]),
      "batched": jax.jit(lambda r, w: jnp.einsum(
          "eci,eio->eco", r.reshape(args.experts, -1, r.shape[1]), w)),
  }
  for height in args.heights:
    if height < 1 or group_rows % height:
      raise ValueError(f"height {height} does not divide a group of "
                       f"{group_rows} rows")
    variants[f"chunks of {height}"] = chunk_loop(height, args.experts)
  times = report.median_seconds(
      [lambda fn=fn: jax.block_until_ready(fn(rows, w))
       for fn in variants.values()], args.iters)
  batched = times[list(variants).index("batched")]
  return [dict(variant=name, time_ms=1e3 * seconds, ratio=seconds / batched)
          for name, seconds in zip(variants, times)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=2048)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--heights", type=int, nargs="+",
                      default=[256, 128, 64, 32, 16, 8])
  parser.add_argument("--iters", type=int, default=30)
  parser.add_argument("--json", default=None, help="write the rows as JSON")
  args = parser.parse_args()
  print(f"{report.machine()}  rows {args.rows}  I {args.width}  "
        f"O {args.hidden}  E {args.experts}  float32, forward")
  rows = run(args)
  print(f"{'variant':<16} {'ms':>8} {'x batched':>10}")
  for r in rows:
    print(f"{r['variant']:<16} {r['time_ms']:8.2f} {r['ratio']:10.2f}")
  report.write_json(args.json, args, rows)


if __name__ == "__main__":
  main()
