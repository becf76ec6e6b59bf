"""The shard_map expert-parallel path: knob checks here, equivalence on 8 fake CPUs."""

import jax
import jax.numpy as jnp
import pytest

from moe_jax import gin_utils
from moe_jax.moe.layer import MoeLayer
from moe_jax.models import configured_model_config
from moe_jax.moe.routers import TokenChoiceRouter
from tests.multidevice.runner import run_check


def layer(**overrides):
  fields = dict(num_experts=3, expert_hidden_dim=4,
                router=TokenChoiceRouter(num_selected_experts=1),
                max_group_size=2, expert_parallel=True)
  fields.update(overrides)
  return MoeLayer(**fields)


def test_needs_a_mesh():
  x = jnp.ones((1, 2, 4))
  with pytest.raises(ValueError, match="needs a mesh"):
    layer().init(jax.random.key(0), x, deterministic=True)


def test_gin_file_turns_it_on_in_both_stacks():
  gin_utils.parse(["gin/models/t5_1_1_tiny_moe.gin",
                   "gin/partitioning/expert_parallel_shard_map.gin"], [])
  config = configured_model_config()
  assert config.encoder_moe.layer.expert_parallel
  assert config.decoder_moe.layer.expert_parallel
  gin_utils.parse(["gin/models/t5_1_1_tiny_moe.gin"], [])
  assert not configured_model_config().encoder_moe.layer.expert_parallel


def test_expert_dropout_matches_one_device_in_distribution_on_8_devices():
  # 2 paths x 2 meshes, then the FLAN-MoE preset's training step.
  out = run_check("check_expert_dropout")
  assert out.count("ok dropout ") == 4, out
  assert "ok flan_switch_base expert_parallel step" in out, out


@pytest.mark.parametrize("case", ["layer", "model"])
def test_expert_parallel_matches_one_device_on_8_fake_devices(case):
  # 4 routers x 5 meshes, each printing one "ok" line.
  assert run_check("check_expert_parallel", case).count("ok ") == 20


def test_dropless_receive_factor_is_checked_at_construction():
  with pytest.raises(ValueError, match="dropless_receive_factor=0"):
    layer(dropless_receive_factor=0)
  # Default: room for every row, nothing dropped.
  assert layer().dropless_receive_factor is None


def test_dropless_exchange_on_8_fake_devices():
  # Skewed loads (an expert receiving nothing) on 2 meshes, counted drops
  # past a small receive factor, the exchange's docstring example and its
  # GPU lowering.
  out = run_check("check_ragged_exchange")
  assert out.count("ok ") == 5, out
