"""Command line entry point: `python -m moe_jax.main COMMAND`.

Commands:
  demo   route a random batch through an MoE layer on every dispatch path and
         print the routing statistics (runs on CPU in seconds).
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from moe_jax.dispatch import Dispatch
from moe_jax.layers import MoeLayer
from moe_jax.routing import ExpertChoiceRouter, TokenChoiceRouter


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
    for path in Dispatch:
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


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m moe_jax.main")
  commands = parser.add_subparsers(dest="command", required=True)
  demo_parser = commands.add_parser("demo", help=demo.__doc__)
  demo_parser.add_argument("--batch", type=int, default=4)
  demo_parser.add_argument("--length", type=int, default=64)
  demo_parser.add_argument("--width", type=int, default=32)
  demo_parser.add_argument("--experts", type=int, default=8)
  demo_parser.add_argument("--capacity_factor", type=float, default=1.0)
  demo_parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  {"demo": demo}[args.command](args)


if __name__ == "__main__":
  main(sys.argv[1:])
