"""Shared by the benchmark scripts: the machine line and the JSON file."""

from __future__ import annotations

import json

import jax


def machine() -> str:
  """'device: <kind>  jax <version>', the start of every table header."""
  return f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}"


def write_json(path: str | None, args, rows: list[dict]) -> None:
  """Writes {device, jax, args, rows} to `path` (nothing when None)."""
  if not path:
    return
  with open(path, "w") as f:
    json.dump({"device": jax.devices()[0].device_kind,
               "jax": jax.__version__, "args": vars(args), "rows": rows}, f,
              indent=1)
