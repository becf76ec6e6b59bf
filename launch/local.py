"""Start N moe_jax processes on this machine, as a multi-host job would.

  python launch/local.py --num_processes=2 --devices_per_process=4 \
      [--dry_run] -- train --gin_file=...

Each process gets `devices_per_process` fake CPU devices (added to the
caller's XLA_FLAGS, whose other flags it keeps) and finds the others
through a coordinator on localhost (`--distributed=env`). Output lines are
prefixed with the process id. Exit status: the first non-zero one, if any; a
failing process stops the others.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Mapping, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from launch.common import job_command, show  # noqa: E402
from moe_jax import distributed  # noqa: E402


_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def process_env(process_id: int, num_processes: int, devices_per_process: int,
                port: int, xla_flags: str) -> dict[str, str]:
  """Environment variables that place one process in the job; `xla_flags`,
  the caller's XLA_FLAGS, keep all but their device count."""
  flags = _DEVICE_COUNT.sub("", xla_flags).split()
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  return {
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": " ".join(flags),
      distributed.COORDINATOR_ADDRESS: f"localhost:{port}",
      distributed.NUM_PROCESSES: str(num_processes),
      distributed.PROCESS_ID: str(process_id),
  }


def _stream(process: subprocess.Popen, prefix: str) -> None:
  for line in process.stdout:
    sys.stdout.write(f"[{prefix}] {line}")
    sys.stdout.flush()


def run(main_args: Sequence[str], num_processes: int, devices_per_process: int,
        port: int, base_env: Mapping[str, str] | None = None) -> int:
  """Runs the processes to completion; returns the job's exit status."""
  command = job_command(main_args, "env", python=sys.executable)
  base_env = dict(os.environ if base_env is None else base_env)
  processes, readers = [], []
  for pid in range(num_processes):
    env = {**base_env, **process_env(pid, num_processes, devices_per_process,
                                     port, base_env.get("XLA_FLAGS", ""))}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=_stream, args=(process, str(pid)))
    reader.start()
    processes.append(process)
    readers.append(reader)
  status = 0
  remaining = list(processes)
  while remaining:
    for process in list(remaining):
      try:
        code = process.wait(timeout=0.5)
      except subprocess.TimeoutExpired:
        continue
      remaining.remove(process)
      if code and not status:
        status = code
        for other in remaining:
          other.terminate()
  for reader in readers:
    reader.join()
  return status


def main(argv: Sequence[str]) -> int:
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--port", type=int, default=12355)
  parser.add_argument("--dry_run", action="store_true",
                      help="print each process's environment and command")
  args = parser.parse_args(argv[:split])
  if args.num_processes < 1 or args.devices_per_process < 1:
    raise ValueError("num_processes and devices_per_process must be >= 1")
  main_args = argv[split + 1:]
  if args.dry_run:
    command = job_command(main_args, "env", python=sys.executable)
    for pid in range(args.num_processes):
      env = process_env(pid, args.num_processes, args.devices_per_process,
                        args.port, os.environ.get("XLA_FLAGS", ""))
      print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()),
            show(command))
    return 0
  return run(main_args, args.num_processes, args.devices_per_process,
             args.port)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
