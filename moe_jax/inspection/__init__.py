"""Checkpoint and routing inspection, for notebooks.

  from moe_jax import inspection as moe_inspect
  ckpt = moe_inspect.open_checkpoint("/path/to/model_dir")     # latest step
  print(moe_inspect.format_param_table(moe_inspect.param_records(ckpt)))
  report = moe_inspect.route_text(ckpt, ["Translate to German: hello"])
  print(report.format_summary())          # per layer: left behind, ...
  report.top_tokens(0)                    # expert -> its most frequent tokens
  moe_inspect.load_heatmap(report, path="load.png")

FLAN-MoE's routing analyses (utilization per task, dropped tokens, routing
change between checkpoints, capacity sweep) are in `analyses`, their plots
in `analysis_plots`, their command line in `analyze`. See docs/inspect.md.
"""

from moe_jax.inspection.checkpoint import (Checkpoint, ParamRecord,
                                           format_param_table,
                                           open_checkpoint, param_records)
from moe_jax.inspection.plots import (expert_id_map, fraction_left_behind,
                                      load_heatmap)
from moe_jax.inspection.routing_report import (DROPPED, LayerReport,
                                               RoutingReport,
                                               default_vocabulary,
                                               route_batch, route_text,
                                               text_batch)
from moe_jax.text import Vocabulary, encode_texts
from moe_jax.train.checkpoints import steps

__all__ = ["Checkpoint", "DROPPED", "LayerReport", "ParamRecord",
           "RoutingReport", "Vocabulary", "default_vocabulary",
           "encode_texts", "expert_id_map", "format_param_table",
           "fraction_left_behind", "load_heatmap", "open_checkpoint",
           "param_records", "route_batch", "route_text", "steps",
           "text_batch"]
