"""Parameter names: '/'-joined key paths."""

import numpy as np

from moe_jax.param_paths import flat_params


def test_names_join_dict_keys_and_list_indices():
  tree = {"encoder": {"block_0": {"kernel": np.zeros(2)}},
          "scales": [np.ones(1), np.ones(3)]}
  flat = flat_params(tree)
  assert list(flat) == ["encoder/block_0/kernel", "scales/0", "scales/1"]
  assert flat["scales/1"].shape == (3,)


def test_a_tuple_can_be_one_leaf():
  axes = {"wi": ("expert", "embed"), "b": (None,)}
  assert flat_params(axes, is_leaf=lambda x: isinstance(x, tuple)) == {
      "b": (None,), "wi": ("expert", "embed")}
