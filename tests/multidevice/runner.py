"""Starts a tests/multidevice check in a subprocess on 8 fake CPU devices."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_check(module: str, *args: str) -> str:
  """Runs `python -m tests.multidevice.<module> args...`; its stdout.

  Fails the calling test with the output's tail on a non-zero exit.
  """
  env = dict(os.environ,
             XLA_FLAGS=("--xla_force_host_platform_device_count=8 "
                        "--xla_backend_optimization_level=0"),
             PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  proc = subprocess.run(
      [sys.executable, "-m", f"tests.multidevice.{module}", *args],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
      check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout
