"""Mesh construction and rules; sharded-vs-single-device checks on 8 fake CPUs."""

import os
import pathlib
import subprocess
import sys

import jax
import pytest

from moe_jax import partitioning

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_make_mesh_fills_minus_one():
  mesh = partitioning.make_mesh(-1, 1, 1)
  assert mesh.axis_names == partitioning.MESH_AXES
  assert mesh.devices.shape == (jax.device_count(), 1, 1)


@pytest.mark.parametrize("sizes", [(0, 1, 1), (-1, -1, 1),
                                   (jax.device_count() + 1, 1, 1)])
def test_make_mesh_rejects_bad_sizes(sizes):
  with pytest.raises(ValueError, match="make_mesh"):
    partitioning.make_mesh(*sizes)


def test_rules_cover_every_mesh_axis_once_per_name():
  rules = dict(partitioning.logical_axis_rules())
  assert rules["expert"] == "expert"
  assert rules["expert_mlp"] == "model"
  assert dict(partitioning.logical_axis_rules(fsdp=True))["embed"] == "data"


def test_sharded_layer_matches_one_device_on_8_fake_devices():
  env = dict(os.environ,
             XLA_FLAGS=("--xla_force_host_platform_device_count=8 "
                        "--xla_backend_optimization_level=0"),
             PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  proc = subprocess.run(
      [sys.executable, "-m", "tests.multidevice.check_sharded_layer"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
      check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert proc.stdout.count("ok ") == 20, proc.stdout
