"""The shard_map expert-parallel path: knob checks here, equivalence on 8 fake CPUs."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from moe_jax import gin_utils
from moe_jax.moe.layer import MoeLayer
from moe_jax.models import configured_model_config
from moe_jax.moe.routers import TokenChoiceRouter

ROOT = pathlib.Path(__file__).resolve().parents[1]


def layer(**overrides):
  fields = dict(num_experts=3, expert_hidden_dim=4,
                router=TokenChoiceRouter(num_selected_experts=1),
                max_group_size=2, expert_parallel=True)
  fields.update(overrides)
  return MoeLayer(**fields)


def test_expert_dropout_rejected():
  with pytest.raises(ValueError, match="expert_dropout_rate"):
    layer(expert_dropout_rate=0.1)


def test_needs_a_mesh():
  x = jnp.ones((1, 2, 4))
  with pytest.raises(ValueError, match="needs a mesh"):
    layer().init(jax.random.key(0), x, deterministic=True)


def test_gin_file_turns_it_on_in_both_stacks():
  gin_utils.parse(["gin/models/t5_1_1_tiny_moe.gin",
                   "gin/partitioning/expert_parallel_shard_map.gin"], [])
  config = configured_model_config()
  assert config.encoder_moe.expert_parallel
  assert config.decoder_moe.expert_parallel
  gin_utils.parse(["gin/models/t5_1_1_tiny_moe.gin"], [])
  assert not configured_model_config().encoder_moe.expert_parallel


def run_check(case: str) -> str:
  env = dict(os.environ,
             XLA_FLAGS=("--xla_force_host_platform_device_count=8 "
                        "--xla_backend_optimization_level=0"),
             PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  proc = subprocess.run(
      [sys.executable, "-m", "tests.multidevice.check_expert_parallel", case],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
      check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.parametrize("case", ["layer", "model"])
def test_expert_parallel_matches_one_device_on_8_fake_devices(case):
  # 4 routers x 5 meshes, each printing one "ok" line.
  assert run_check(case).count("ok ") == 20
