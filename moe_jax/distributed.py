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
from jax.experimental import multihost_utils
import numpy as np

from moe_jax import jax_compat, knobs

COORDINATOR_ADDRESS = "MOE_JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "MOE_JAX_NUM_PROCESSES"
PROCESS_ID = "MOE_JAX_PROCESS_ID"
# Seconds without a heartbeat after which the coordination service declares
# a process lost and ends the others, naming it ("The following tasks are
# unhealthy (stopped sending heartbeats): 1"); JAX's default is 100.
HEARTBEAT_TIMEOUT_S = 20


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
               env: Optional[Mapping[str, str]] = None,
               heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> None:
  """Starts JAX's multi-process runtime for `mode` (see module docstring).

  A process that dies (kill -9, a lost host) ends the others within about
  `heartbeat_timeout_s` seconds, with a message naming it, instead of
  leaving them blocked in a collective.
  """
  mode = knobs.choice(Mode, "distributed", mode)
  if mode == Mode.NONE:
    return
  if mode == Mode.AUTO:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
    return
  group = ProcessGroup.from_env(os.environ if env is None else env)
  # CPU backends need a collectives library to talk across processes.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=group.coordinator_address,
      num_processes=group.num_processes,
      process_id=group.process_id,
      heartbeat_timeout_seconds=heartbeat_timeout_s)


def barrier(name: str, timeout_s: int = 900) -> None:
  """Waits until every process reaches `name` (no-op for one process).

  Processes finish start-up (imports, data, tracing) at different times;
  the first CPU collective (gloo) gives the late one only 30 s, so jobs meet
  here first, through the coordination service, which waits `timeout_s`.
  """
  if jax.process_count() == 1:
    return
  jax_compat.coordination_client().wait_at_barrier(name, timeout_s * 1000)


def agreed_signal(signum: Optional[int]) -> Optional[int]:
  """The stop signal of the job: the largest signal number any process has
  received (`signum`: this process's, None if none), or None.

  A collective: every process calls it at the same step, and all get the
  same answer, so a signal seen by one host (a preempted TPU host) stops
  every process at that step instead of leaving the others waiting in the
  next step's collectives. Free for one process.
  """
  if jax.process_count() == 1:
    return signum
  seen = multihost_utils.process_allgather(np.int32(signum or 0))
  return int(np.max(seen)) or None
