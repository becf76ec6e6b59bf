"""Params/FLOPs table: exact against the built tree, published sizes."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from moe_jax import flops, gin_utils
from moe_jax.models import build_model, configured_model_config, dummy_batch


def _config(path, bindings=()):
  gin_utils.parse([path], bindings)
  return configured_model_config()


@pytest.mark.parametrize("path", ["gin/models/t5_1_1_tiny_moe.gin",
                                  "gin/models/decoder_only_tiny.gin",
                                  "gin/models/mixtral_style_tiny.gin"])
def test_total_equals_the_built_tree_exactly(path):
  config = _config(path)
  counts = flops.count(config)
  variables = build_model(config).init(
      jax.random.PRNGKey(0), **dummy_batch(config, 1, 4, 4),
      enable_dropout=False)
  real = sum(np.size(x) for x in jax.tree.leaves(nn.unbox(variables)["params"]))
  assert counts.total_params == real
  assert sum(counts.params_by_part.values()) == real
  assert counts.router_params == counts.params_by_part["routers"] > 0


# Published sizes; sources in the moe_jax.flops docstring.
@pytest.mark.parametrize("path,published", [
    ("gin/models/t5_1_1_small.gin", 77e6),
    ("gin/models/t5_1_1_base.gin", 248e6),
    ("gin/models/t5_1_1_large.gin", 783e6),
    ("gin/models/t5_1_1_xl.gin", 2.85e9),
    ("gin/models/switch_base_8.gin", 0.62e9),
    ("gin/models/switch_base_128.gin", 7.42e9),
    ("gin/models/st_moe_32b.gin", 269e9),
])
def test_published_sizes_within_two_percent(path, published):
  total = flops.count(_config(path)).total_params
  assert abs(total - published) / published < 0.02, total


def test_flops_of_a_tiny_dense_decoder_by_hand():
  config = _config("gin/models/decoder_only_tiny.gin", [
      "config.TransformerConfig.decoder_moe = None"])
  counts = flops.count(config, input_length=5, target_length=3)
  d, f, inner, vocab, layers, length = 32, 64, 2 * 16, 512, 2, 8
  per_layer = 4 * d * inner + 3 * d * f
  want = 2 * (layers * per_layer + d * vocab) + layers * 4 * length * inner
  assert counts.decoder_flops_per_token == want
  assert counts.encoder_flops_per_token == 0
  assert counts.forward_flops == length * want
  assert counts.active_params_per_token == counts.total_params


def test_active_params_count_k_of_e_experts():
  config = _config("gin/models/t5_1_1_tiny_moe.gin")  # 8 experts, top-2
  counts = flops.count(config)
  experts = counts.params_by_part["experts"]
  assert counts.active_params_per_token == pytest.approx(
      counts.total_params - experts + experts * 2 / 8)


def test_memory_estimate_shards_experts_over_the_expert_axis():
  config = _config("gin/models/switch_base_128.gin")
  counts = flops.count(config)
  one = flops.memory_estimate(config, counts, (1, 1, 1), batch=8)
  sharded = flops.memory_estimate(config, counts, (1, 8, 1), batch=8)
  experts = counts.params_by_part["experts"]
  assert one.params - sharded.params == pytest.approx(4 * experts * 7 / 8)
  adamw = flops.memory_estimate(config, counts, (1, 1, 1), 8, "adamw")
  assert adamw.optimizer == pytest.approx(2 * adamw.params)
  with pytest.raises(ValueError, match="optimizer"):
    flops.memory_estimate(config, counts, (1, 1, 1), 8, "sgd")


def test_memory_estimate_divides_by_the_sharding_rules():
  config = _config("gin/models/switch_base_128.gin")
  counts = flops.count(config)
  experts = counts.params_by_part["experts"]
  others = counts.total_params - experts
  one = flops.memory_estimate(config, counts, (1, 1, 1), batch=64)
  mesh = flops.memory_estimate(config, counts, (2, 4, 2), batch=64,
                               fsdp=True)
  # Experts over expert x model, the rest over model, all over data (fsdp).
  assert mesh.params == pytest.approx(4 * (experts / 8 + others / 2) / 2)
  assert mesh.gradients == mesh.params
  assert mesh.optimizer == pytest.approx(0.01 * mesh.params)
  # Tokens split over data x expert (the `batch` rule), not over model.
  assert mesh.activations == pytest.approx(one.activations / 8)
  data_only = flops.memory_estimate(config, counts, (8, 1, 1), batch=64)
  assert data_only.activations == pytest.approx(mesh.activations)
  with pytest.raises(ValueError, match="mesh"):
    flops.memory_estimate(config, counts, (0, 1, 1), batch=64)


def test_cli_json_has_the_contract_keys():
  out = subprocess.run(
      [sys.executable, "-m", "moe_jax.flops",
       "--gin_file=gin/models/switch_base_8.gin", "--gin.NUM_EXPERTS=16",
       "--json"], capture_output=True, text=True, check=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["router_params"] > 0
  sixteen = flops.count(_config("gin/models/switch_base_16.gin"))
  assert result["total_params"] == sixteen.total_params
