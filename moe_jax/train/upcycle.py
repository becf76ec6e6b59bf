"""Sparse upcycling: an MoE model's parameters from a dense checkpoint.

Layers are matched by their index in the stack (a dense stack has blocks of
one layer, a sparse one blocks of `sparse_every` layers); every parameter the
two layers share is copied, and the dense FFN of a layer that is sparse in the
target becomes every expert of its MoE layer (Komatsuzaki et al. 2023);
routers keep their fresh initialization. The optimizer state starts anew (callers build it from the returned params).

With all experts equal, an upcycled layer outputs (sum of the token's
combine weights) * dense_ffn(x): exactly the dense output when the gates sum
to one (renormalized top-k) and nothing is dropped.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp


def upcycle(dense_params: Mapping[str, Any], sparse_params: Mapping[str, Any]
            ) -> dict[str, Any]:
  """Sparse parameters filled from `dense_params`.

  Args:
    dense_params: parameters of the dense model.
    sparse_params: freshly initialized parameters of the sparse model with
      the same dimensions (its routers stay as they are).

  Raises:
    ValueError: a shared parameter has another shape, or a sparse layer has
      no dense FFN to copy from.
  """
  dense, sparse = nn.unbox(dense_params), nn.unbox(sparse_params)
  merged = _merge(_by_layer(dense), _by_layer(sparse), path=())
  return _nest_like(merged, sparse)


def _layer_names(stack: Mapping[str, Any]):
  """(block name, layer name, index of the layer in the stack) of a stack
  laid out as {block_b: {layer_l: ...}}."""
  size = len([k for k in stack["block_0"] if k.startswith("layer_")])
  for block, layers in stack.items():
    if block.startswith("block_"):
      for layer in layers:
        yield block, layer, int(block[6:]) * size + int(layer[6:])


def _by_layer(params: Mapping[str, Any]) -> dict[str, Any]:
  """{stack: {block_b: {layer_l: p}}} -> {stack: {"layer <i>": p}}."""
  out = {}
  for name, sub in params.items():
    if isinstance(sub, Mapping) and "blocks" in sub:
      raise ValueError(f"{name}: scanned parameters (scan_layers=True) are not "
                       "supported; upcycle the unrolled layout")
    if isinstance(sub, Mapping) and "block_0" in sub:
      flat = {k: v for k, v in sub.items() if not k.startswith("block_")}
      for block, layer, index in _layer_names(sub):
        flat[f"layer {index}"] = sub[block][layer]
      out[name] = flat
    else:
      out[name] = sub
  return out


def _nest_like(flat: Mapping[str, Any], layout: Mapping[str, Any]
               ) -> dict[str, Any]:
  """Inverse of `_by_layer` for the block layout of `layout`."""
  out = {}
  for name, sub in layout.items():
    if isinstance(sub, Mapping) and "block_0" in sub:
      out[name] = {k: v for k, v in flat[name].items()
                   if not k.startswith("layer ")}
      for block, layer, index in _layer_names(sub):
        out[name].setdefault(block, {})[layer] = flat[name][f"layer {index}"]
    else:
      out[name] = flat[name]
  return out


def _merge(dense: Mapping[str, Any], sparse: Mapping[str, Any],
           path: tuple[str, ...]) -> dict[str, Any]:
  out = {}
  for name, target in sparse.items():
    where = path + (name,)
    if name == "moe":
      if "mlp" not in dense:
        raise ValueError(f"{'/'.join(where)}: the dense model has no FFN "
                         "('mlp') in this layer to copy into the experts")
      out[name] = {"router": target["router"],
                   "experts": _experts_from(dense["mlp"], target["experts"],
                                            where)}
    elif isinstance(target, Mapping):
      out[name] = _merge(dense.get(name, {}), target, where)
    elif name in dense:
      if dense[name].shape != target.shape:
        raise ValueError(f"{'/'.join(where)}: dense shape {dense[name].shape}"
                         f" != sparse shape {target.shape}")
      out[name] = dense[name]
    else:
      out[name] = target
  return out


def _experts_from(mlp: Mapping[str, Any], experts: Mapping[str, Any],
                  where: tuple[str, ...]) -> dict[str, Any]:
  """Broadcasts each dense FFN matrix <[D, F]> to <[E, D, F]>."""
  out = {}
  for name, target in experts.items():
    if name not in mlp or mlp[name].shape != target.shape[1:]:
      raise ValueError(f"{'/'.join(where)}/experts/{name}: no dense FFN "
                       f"matrix of shape {target.shape[1:]} to copy")
    out[name] = jnp.broadcast_to(mlp[name], target.shape).astype(target.dtype)
  return out
