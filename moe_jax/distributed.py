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

import contextlib
import dataclasses
import enum
import itertools
import os
import sys
import threading
import time
from typing import Callable, Iterator, Mapping, Optional

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
# Seconds a peer may go without a beat of `peer_watch` before it counts as
# lost; below HEARTBEAT_TIMEOUT_S, so the job's own message comes first.
PEER_TIMEOUT_S = 10
# Exit status of a process that stops because a peer was lost: EX_TEMPFAIL
# of sysexits.h, a failure that rerunning the same command recovers from.
PEER_LOST_EXIT_CODE = 75
_DONE = "done"
_watches = itertools.count()


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


def count(flag: bool) -> int:
  """How many processes pass a true `flag`; a collective, called by every
  process at the same point (free for one process)."""
  if jax.process_count() == 1:
    return int(flag)
  return int(np.sum(multihost_utils.process_allgather(np.int32(flag))))


class _PeerWatch(threading.Thread):
  """Beats every `interval_s` (a counter under `prefix` + process id in the
  coordination service's key-value store) and reads the others' beats; a
  process whose counter stays the same for `timeout_s` is lost."""

  def __init__(self, prefix: str, situation: Callable[[], str],
               timeout_s: float, interval_s: float):
    super().__init__(name="moe_jax peer watch", daemon=True)
    self.stopped = threading.Event()
    self._prefix, self._situation = prefix, situation
    self._timeout_s, self._interval_s = timeout_s, interval_s
    self._client = jax_compat.coordination_client()

  def beat(self, value: str) -> None:
    """Sets this process's beat to `value`."""
    self._client.key_value_set(f"{self._prefix}{jax.process_index()}",
                               value, allow_overwrite=True)

  def run(self) -> None:
    me = jax.process_index()
    changed = {p: (None, time.monotonic())
               for p in range(jax.process_count()) if p != me}
    for beat in itertools.count():
      try:
        self.beat(str(beat))
        seen = dict(self._client.key_value_dir_get(self._prefix))
      except Exception:  # pylint: disable=broad-except
        # The service is gone with process 0; JAX ends this process.
        seen = {}
      now = time.monotonic()
      for p, (value, _) in list(changed.items()):
        new = seen.get(f"{self._prefix}{p}", value)
        if new == _DONE:
          del changed[p]
        elif new != value:
          changed[p] = (new, now)
      lost = [p for p, (_, since) in changed.items()
              if now - since > self._timeout_s]
      if lost:
        self._stop_job(lost)
      if self.stopped.wait(self._interval_s):
        return

  def _stop_job(self, lost: list[int]) -> None:
    try:
      situation = self._situation()
    except Exception as e:  # pylint: disable=broad-except
      situation = f"(where the job stands is unknown: {e})"
    print(f"moe_jax: process {jax.process_index()} stops (exit status "
          f"{PEER_LOST_EXIT_CODE}): lost process {', '.join(map(str, lost))} "
          f"of {jax.process_count()} (no heartbeat for {self._timeout_s:g} "
          f"s) {situation}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Not sys.exit: the collectives and JAX's shutdown barrier would wait
    # for the lost process.
    os._exit(PEER_LOST_EXIT_CODE)  # pylint: disable=protected-access


@contextlib.contextmanager
def peer_watch(situation: Callable[[], str],
               timeout_s: float = PEER_TIMEOUT_S,
               interval_s: float = 1.0) -> Iterator[None]:
  """While the block runs, every process watches that the others are alive.

  A process that stops beating for `timeout_s` (killed, its host lost) is
  named in one line on stderr, "moe_jax: process Q stops (exit status
  75): lost process P of N (no heartbeat for T s) <situation()>", and each
  survivor exits with PEER_LOST_EXIT_CODE instead of waiting in a
  collective. `situation()` says where the job stands and what to do
  (the step, the checkpoint a rerun resumes from). An exception in the
  block (a collective that failed because its peer died: "Gloo AllGather
  failed ... Connection reset by peer") is raised only after the watch had
  time to name a lost peer. Leaving the block normally tells the others
  not to wait for this process. All processes enter the block together
  (after a `barrier`). Free for one process.

  Not covered: losing process 0, which hosts the coordination service;
  JAX ends the other processes at once ("Failed to send RPC to
  coordination service"), before Python code can run.
  """
  if jax.process_count() == 1:
    yield
    return
  watch = _PeerWatch(f"moe_jax/peer_watch/{next(_watches)}/", situation,
                     timeout_s, interval_s)
  watch.start()
  try:
    yield
  except Exception:
    time.sleep(timeout_s + 2 * interval_s)  # the watch may end the process
    raise
  finally:
    watch.stopped.set()
    watch.join()
  watch.beat(_DONE)
