"""Shared by the benchmark scripts: the machine line, round-robin timing
and the JSON file."""

from __future__ import annotations

import json
import statistics
import time
from typing import Callable

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


def median_seconds(calls: list[Callable[[], object]], iters: int
                   ) -> list[float]:
  """Median wall seconds of each call (each must block until its work is
  done), after one warm-up call of each. The calls are timed round-robin,
  one of each in turn for `iters` rounds, so that a slow spell of the
  machine falls on every variant alike, not on whichever ran then."""
  for call in calls:
    call()  # compile + warm-up
  times = [[] for _ in calls]
  for _ in range(iters):
    for call, seconds in zip(calls, times):
      start = time.perf_counter()
      call()
      seconds.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]
