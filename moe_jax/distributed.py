"""Multi-controller start-up: one JAX process per host.

`initialize(mode)` must run before any other JAX call touches devices.

Modes (gin / flag `--distributed`):
  none:  a single process (default on one machine).
  auto:  `jax.distributed.initialize()` with no arguments: JAX reads the
         cluster from its environment (Cloud TPU VMs, SLURM, Open MPI, ...).
  env:   explicit values from the environment, as set by `launch/local.py`:
         MOE_JAX_COORDINATOR_ADDRESS (host:port), MOE_JAX_NUM_PROCESSES,
         MOE_JAX_PROCESS_ID. On CPU the processes exchange data with gloo.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from typing import Mapping, Optional

import jax

from moe_jax import jax_compat

COORDINATOR_ADDRESS = "MOE_JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "MOE_JAX_NUM_PROCESSES"
PROCESS_ID = "MOE_JAX_PROCESS_ID"


class Mode(str, enum.Enum):
  NONE = "none"
  AUTO = "auto"
  ENV = "env"


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  """Where this process sits among the job's processes."""
  coordinator_address: str
  num_processes: int
  process_id: int

  @classmethod
  def from_env(cls, env: Mapping[str, str]) -> "ProcessGroup":
    missing = [k for k in (COORDINATOR_ADDRESS, NUM_PROCESSES, PROCESS_ID)
               if k not in env]
    if missing:
      raise ValueError(f"distributed mode 'env' needs {missing} in the "
                       "environment (launch/local.py sets them)")
    group = cls(env[COORDINATOR_ADDRESS], int(env[NUM_PROCESSES]),
                int(env[PROCESS_ID]))
    if not 0 <= group.process_id < group.num_processes:
      raise ValueError(f"{PROCESS_ID}={group.process_id} is outside "
                       f"[0, {NUM_PROCESSES}={group.num_processes})")
    return group


def initialize(mode: str = "none",
               env: Optional[Mapping[str, str]] = None) -> None:
  """Starts JAX's multi-process runtime for `mode` (see module docstring)."""
  try:
    mode = Mode(mode)
  except ValueError:
    raise ValueError(f"distributed must be one of {[m.value for m in Mode]}; "
                     f"got distributed={mode!r}") from None
  if mode == Mode.NONE:
    return
  if mode == Mode.AUTO:
    jax.distributed.initialize()
    return
  group = ProcessGroup.from_env(os.environ if env is None else env)
  # CPU backends need a collectives library to talk across processes.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=group.coordinator_address,
      num_processes=group.num_processes,
      process_id=group.process_id)


def barrier(name: str, timeout_s: int = 900) -> None:
  """Waits until every process reaches `name` (no-op for one process).

  Processes finish start-up (imports, data, tracing) at different times;
  the first CPU collective (gloo) gives the late one only 30 s, so jobs meet
  here first, through the coordination service, which waits `timeout_s`.
  """
  if jax.process_count() == 1:
    return
  jax_compat.coordination_client().wait_at_barrier(name, timeout_s * 1000)
