"""Capacity formula, token grouping, the path registry, profile scopes."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import gin_utils
from moe_jax.models import configured_model_config
from moe_jax.moe import dispatch, grouped_matmul
from tests.layer_helpers import init, inputs, make_layer


@pytest.mark.parametrize("tokens,experts,factor,min_cap,k,want", [
    (64, 8, 1.0, 4, 1, 8),      # cf * S * k / E
    (64, 8, 1.25, 4, 2, 20),    # k multiplies: 1.25 * 64 * 2 / 8
    (64, 8, 0.1, 4, 1, 4),      # min_expert_capacity wins
    (10, 4, 1.0, 0, 1, 2),      # round(2.5) = 2 (round half to even)
    (14, 4, 1.0, 0, 1, 4),      # round(3.5) = 4
    (16, 2, 4.0, 1, 2, 16),     # capped at S
])
def test_expert_capacity_formula(tokens, experts, factor, min_cap, k, want):
  assert dispatch.expert_capacity(tokens, experts, factor, min_cap, k) == want


def test_expert_capacity_rejects_nonpositive_factor():
  with pytest.raises(ValueError, match="capacity_factor"):
    dispatch.expert_capacity(8, 2, 0.0, 1)


def test_group_shape():
  assert dispatch.group_shape(24, 8, False) == (3, 8)
  assert dispatch.group_shape(6, 8, False) == (1, 6)
  assert dispatch.group_shape(20, 8, True) == (3, 8)
  with pytest.raises(ValueError, match="max_group_size=8"):
    dispatch.group_shape(20, 8, False)
  # Groups split over 8 devices: G rounds up to a multiple of 8, S shrinks.
  assert dispatch.group_shape(256, 4096, False, group_multiple=8) == (8, 32)
  assert dispatch.group_shape(48, 16, False, group_multiple=4) == (4, 12)
  assert dispatch.group_shape(64, 8, False, group_multiple=4) == (8, 8)
  assert dispatch.group_shape(20, 8, True, group_multiple=8) == (8, 3)
  with pytest.raises(ValueError, match="pad_to_group_size"):
    dispatch.group_shape(20, 8, False, group_multiple=8)


def test_group_tokens_pads_with_zeros():
  x = jnp.arange(10.0).reshape(5, 2)
  grouped = dispatch.group_tokens(x, 2, 3)
  assert grouped.shape == (2, 3, 2)
  np.testing.assert_array_equal(grouped.reshape(6, 2)[:5], x)
  np.testing.assert_array_equal(grouped[1, 2], 0.0)


def test_every_path_is_registered():
  assert set(dispatch.PATHS) == set(dispatch.Dispatch)


@pytest.mark.parametrize("router,path", [("top2", "einsum"),
                                         ("expert_choice", "scatter"),
                                         ("top1", "scatter"),
                                         ("top2", "dropless")])
def test_profile_scopes_name_the_steps(router, path):
  layer = make_layer(router, path)
  x = inputs()
  params = init(layer, x)
  lowered = jax.jit(lambda p, v: layer.apply(p, v, deterministic=True)).lower(
      params, x)
  scopes = set(re.findall(r"\b(route|dispatch|experts|combine)/",
                          lowered.as_text(debug_info=True)))
  assert scopes == {"route", "dispatch", "experts", "combine"}


ROOT = pathlib.Path(__file__).resolve().parents[1]
DISPATCH_GIN = sorted(p.relative_to(ROOT).as_posix()
                      for p in (ROOT / "gin" / "dispatch").glob("*.gin"))


def _configured(*files):
  gin_utils.parse(files, [])
  return configured_model_config()


@pytest.mark.parametrize("path", DISPATCH_GIN)
def test_dispatch_gin_files_reach_both_stacks(path):
  config = _configured("gin/models/t5_1_1_tiny_moe.gin", path)
  default = _configured("gin/models/t5_1_1_tiny_moe.gin")
  for stack in ("encoder", "decoder"):
    moe, plain = config.moe(stack).layer, default.moe(stack).layer
    assert (moe.dispatch, moe.grouped_matmul) != (plain.dispatch,
                                                  plain.grouped_matmul)
    dispatch.Dispatch(moe.dispatch)
    grouped_matmul.GroupedMatmul(moe.grouped_matmul)
