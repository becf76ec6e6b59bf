"""Parameter names: a leaf's path in a parameter tree as one '/'-joined
string, e.g. 'encoder/block_0/layer_0/moe/router/router_weights/kernel'.

Warm start matches these names against `init_params_include`, the optimizer
freezes by their parts, FLOP counts classify by them and inspection tables
list them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax


def param_path(key_path: jax.tree_util.KeyPath) -> str:
  """The '/'-joined name of a key path (from `tree_*_with_path`)."""
  return jax.tree_util.keystr(key_path, simple=True, separator="/")


def flat_params(tree: Any, is_leaf: Optional[Callable[[Any], bool]] = None
                ) -> dict[str, Any]:
  """{parameter name: leaf} of `tree`, in tree order."""
  return {param_path(path): leaf for path, leaf in
          jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}
