"""Reads T5X-format checkpoints (T5 v1.1, FLAN-T5, Switch, ST-MoE releases)
into moe_jax parameters, without T5X or flaxformer.

  params = t5x_checkpoint.import_t5x("gs://.../checkpoint_1000000", config)

A T5X checkpoint is a directory `checkpoint_<step>/` holding `checkpoint`, a
msgpack file (`flax.serialization`) of {"version": 3, "optimizer":
{"target": parameters, "state": step and optimizer slots}}. Each parameter
leaf is either an array stored inline or, for arrays T5X partitions (all
parameters of the released models), a tensorstore spec: a zarr array under
`target.<name with dots>/` beside the msgpack file. The names are
flaxformer's (`moe_jax.interop.flaxformer_names`).

Host memory: the msgpack file is read whole (it is small when the arrays
live in tensorstore, as they do in released checkpoints); then each
parameter is read, checked and converted alone and only the converted
float32 array is kept, so the peak is one copy of the parameters in
float32 plus one parameter in flight. The optimizer slots are never read.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping, Union

from etils import epath
from flax import serialization, traverse_util
import numpy as np
import tensorstore as ts

from moe_jax.interop import checks, flaxformer_names
from moe_jax.models.config import TransformerConfig

_STEP_DIR = re.compile(r"checkpoint_(\d+)")
PathLike = Union[str, os.PathLike]


def checkpoint_file(path: PathLike) -> epath.Path:
  """The msgpack `checkpoint` file of `path`: that file, a step directory
  holding it, or a model directory (its highest `checkpoint_<step>`).

  Raises:
    ValueError: no T5X checkpoint there (the path is named).
  """
  path = epath.Path(path)
  if path.is_dir() and not (path / "checkpoint").exists():
    steps = sorted((int(m.group(1)), child) for child in path.iterdir()
                   if (m := _STEP_DIR.fullmatch(child.name)))
    if steps:
      path = steps[-1][1]
  if path.is_dir():
    if (path / "state" / "checkpoint").exists():
      raise ValueError(f"{path} is a T5X checkpoint in Orbax format "
                       "(state/ subdirectory); only T5X's native format "
                       "(msgpack + tensorstore) is read")
    path = path / "checkpoint"
  if not path.is_file():
    raise ValueError(f"no T5X checkpoint at {path} (expected a msgpack "
                     "'checkpoint' file, a checkpoint_<step> directory or "
                     "a model directory of them)")
  return path


def is_t5x_checkpoint(path: PathLike) -> bool:
  """Whether `checkpoint_file(path)` finds a T5X checkpoint."""
  try:
    checkpoint_file(path)
  except ValueError:
    return False
  return True


def _absolute_spec(spec: dict[str, Any], directory: epath.Path
                   ) -> dict[str, Any]:
  """A spec whose array path (relative to the step directory, as T5X writes
  it: in the kvstore, or at the top level in older files) is resolved;
  on gs:// the checkpoint's own bucket replaces T5X's placeholder one."""
  spec = dict(spec)
  relative = spec["kvstore"].get("path", spec.pop("path", None))
  location = os.fspath(directory)
  if location.startswith("gs://"):
    bucket, _, prefix = location[len("gs://"):].partition("/")
    spec["kvstore"] = {"driver": "gcs", "bucket": bucket,
                       "path": f"{prefix}/{relative}"}
  else:
    spec["kvstore"] = {"driver": "file",
                       "path": os.path.join(location, relative)}
  return spec


def _is_spec(leaf: Any) -> bool:
  return isinstance(leaf, dict) and "kvstore" in leaf and "driver" in leaf


def open_parameters(path: PathLike) -> dict[str, Any]:
  """{flaxformer name: inline numpy array or opened tensorstore} of the
  checkpoint's `target` (parameters). Opening reads only metadata."""
  file = checkpoint_file(path)
  contents = serialization.msgpack_restore(file.read_bytes())
  version = contents.get("version", 0)
  if version < 2:
    raise ValueError(f"{file}: T5X checkpoint version {version}; versions "
                     "before 2 (pre-2021 Flax optimizer layout) are not read")
  target = contents["optimizer"]["target"]
  del contents
  flat = traverse_util.flatten_dict(
      target, is_leaf=lambda _, leaf: _is_spec(leaf), sep="/")
  return {name: (ts.open(_absolute_spec(leaf, file.parent),
                         read=True).result()
                 if _is_spec(leaf) else np.asarray(leaf))
          for name, leaf in flat.items()}


def _read(leaf: Any) -> np.ndarray:
  if isinstance(leaf, ts.TensorStore):
    leaf = leaf.read().result()
  return np.asarray(leaf, np.float32)


# Where flaxformer's scanned stacks keep their layers (`scan_layers=True`).
_SCANNED_PREFIXES = ("encoder/encoder/", "decoder/decoder/")


def check_unscanned(names: Iterable[str]) -> None:
  """Raises for the names of a scanned flaxformer checkpoint.

  Scanned flaxformer stacks keep every layer's arrays stacked (along
  `scan_axis`, default 1) under `encoder/encoder/` and `decoder/decoder/`,
  and cannot share a relative position bias: each layer holds its own
  table. moe_jax's models (unrolled or scanned) share one table per
  stack, so restacking the arrays would not give a model they can run.

  Raises:
    ValueError: naming the first scanned weight.
  """
  scanned = sorted(n for n in names if n.startswith(_SCANNED_PREFIXES))
  if scanned:
    raise ValueError(
        f"{scanned[0]}: a scanned flaxformer checkpoint (scan_layers=True: "
        "layers stacked under encoder/encoder/, decoder/decoder/, with one "
        "relative position bias per layer); it is not read, since moe_jax's "
        "models share one relative position bias per stack. Start from an "
        "unscanned checkpoint (encoder/layers_<i>/...)")


def import_params(weights: Mapping[str, Any], config: TransformerConfig, *,
                  allow_non_finite: bool = False) -> dict[str, Any]:
  """moe_jax `params` (nested dict of float32 numpy arrays) from
  {flaxformer name: array or tensorstore} (consumed: each entry is dropped
  once converted, so an in-memory input is not held twice).

  Raises:
    KeyError: a weight the config needs is missing (named).
    ValueError: a weight the config does not describe is left over, a
      shape differs from the config's (both at import, before any array is
      read), a weight holds NaN or inf (unless `allow_non_finite`), or the
      config has no flaxformer counterpart, or the checkpoint is a scanned
      one (`check_unscanned`).
  """
  weights = dict(weights)
  check_unscanned(weights)
  layout = flaxformer_names.layout(config)
  expected = layout.flaxformer_shapes()
  checks.check_names(weights, expected)
  checks.check_shapes(weights, expected)
  flat = {}
  for path, name, kind in layout.pairs:
    w = _read(weights.pop(name))
    checks.check_finite(name, w, allow_non_finite=allow_non_finite)
    flat[path] = flaxformer_names.to_moe_jax(w, kind, config)
  return traverse_util.unflatten_dict(flat)


def import_t5x(path: PathLike, config: TransformerConfig, *,
               allow_non_finite: bool = False) -> dict[str, Any]:
  """moe_jax `params` for `config` from the T5X checkpoint at `path` (a
  `checkpoint` file, a `checkpoint_<step>` directory, or a model directory:
  its latest step); local or gs://. Raises as `import_params`."""
  return import_params(open_parameters(path), config,
                       allow_non_finite=allow_non_finite)
