"""Mesh construction and rules; sharded-vs-single-device checks on 8 fake CPUs."""

import jax
import pytest

from moe_jax import axes, partitioning
from tests.multidevice.runner import run_check


def test_make_mesh_fills_minus_one():
  mesh = partitioning.make_mesh(-1, 1, 1)
  assert mesh.axis_names == axes.MESH_AXES
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
  stdout = run_check("check_sharded_layer")
  assert stdout.count("ok ") == 20, stdout
