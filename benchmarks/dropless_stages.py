"""Where the dropless layer's time goes: each stage timed on its own.

  python benchmarks/dropless_stages.py [--quick] [--tokens 2048 --width 256
      --hidden 512 --experts 8 64 --k 1 2 --grouped_matmul blocked]

The stages of `moe_jax.moe.dispatch.dropless_dispatch`, each jitted alone
as forward+backward (value and gradient of a sum of squares of its output
with respect to its float inputs) on the same routing decision:
  route     the token-choice router (logits, softmax, top-k) <[G, S, D]>;
  permute   sort the (token, choice) pairs by expert, gather the rows;
  experts   the gated-gelu experts on the sorted rows (three grouped
            matmuls, split out as `grouped matmuls`: the same three
            products alone, and the rest, the activation);
  combine   scatter the rows back to (token, choice) order and sum each
            token's k results by gate;
and the whole `MoeLayer`, whose time also holds what fusing across stages
saves and what the layer adds (statistics, reshapes). Median of --iters
after a warm-up, the stages timed in turn, one call of each per round. A
benchmark, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

import report
from moe_jax.moe.dispatch import Dispatch, permute, unpermute_and_combine
from moe_jax.moe.experts import Activation, Experts, expert_fns
from moe_jax.moe.grouped_matmul import GroupedMatmul, resolve
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter


def _fwd_bwd_call(fn, *args):
  """A call running fn's forward+backward (gradient of the sum of squares
  of its outputs with respect to all its arguments, float pytrees) and
  blocking until it is done."""

  def loss(*a):
    return sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(fn(*a)))

  step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
  return lambda: jax.block_until_ready(step(*args))


def stages(args, experts: int, k: int) -> dict[str, float]:
  """{stage: ms} for one (E, k)."""
  key_x, key_p = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(key_x, (1, args.tokens, args.width))
  mask = jnp.ones(x.shape[:2])
  router = TokenChoiceRouter(num_selected_experts=k)
  route_kw = dict(num_experts=experts, capacity=None, deterministic=True,
                  token_ids=None)
  router_params = router.init(key_p, x, mask, **route_kw)
  route = lambda p, v: router.apply(p, v, mask, **route_kw).decision.gates
  decision = router.apply(router_params, x, mask, **route_kw).decision
  rows, order, sizes = permute(x, decision.expert_index, experts)
  weights = nn.unbox(Experts(num_experts=experts, hidden_dim=args.hidden,
                             activation=Activation.GATED_GELU).init(
                                 key_p, args.width))["params"]
  matmul = resolve(args.grouped_matmul)
  grouped = lambda w, r: expert_fns(w, Activation.GATED_GELU,
                                    matmul).grouped(r, sizes)
  hidden = jnp.zeros((rows.shape[0], args.hidden))
  products = lambda w, r, h: (matmul(r, w["wi_0"], sizes),
                              matmul(r, w["wi_1"], sizes),
                              matmul(h, w["wo"], sizes))
  layer = MoeLayer(num_experts=experts, expert_hidden_dim=args.hidden,
                   router=router, dispatch=Dispatch.DROPLESS,
                   grouped_matmul=GroupedMatmul(args.grouped_matmul),
                   max_group_size=args.tokens)
  layer_params = layer.init(key_p, x, deterministic=True)
  calls = {
      "route": _fwd_bwd_call(route, router_params, x),
      "permute": _fwd_bwd_call(
          lambda v: permute(v, decision.expert_index, experts)[0], x),
      "experts": _fwd_bwd_call(grouped, weights, rows),
      "  grouped matmuls": _fwd_bwd_call(products, weights, rows, hidden),
      "combine": _fwd_bwd_call(
          lambda r, g: unpermute_and_combine(r, order, g), rows,
          decision.gates),
      "whole layer": _fwd_bwd_call(lambda p, v: layer.apply(
          p, v, deterministic=True)[0], layer_params, x),
  }
  seconds = report.median_seconds(list(calls.values()), args.iters)
  return {name: 1e3 * t for name, t in zip(calls, seconds)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
  parser.add_argument("--k", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--grouped_matmul", default="auto",
                      choices=[m.value for m in GroupedMatmul])
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, for checking that the script runs")
  args = parser.parse_args()
  if args.quick:
    args.tokens, args.width, args.hidden, args.iters = 256, 64, 128, 2
    args.experts, args.k = [8], [2]
  print(f"{report.machine()}  "
        f"tokens {args.tokens}  d {args.width}  f {args.hidden}  "
        f"grouped matmul {args.grouped_matmul}  float32, forward+backward")
  for experts in args.experts:
    for k in args.k:
      for name, ms in stages(args, experts, k).items():
        print(f"E {experts:>3}  k {k}  {name:<18} {ms:9.2f} ms")


if __name__ == "__main__":
  main()
