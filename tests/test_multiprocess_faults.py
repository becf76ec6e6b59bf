"""A real 2-process job (CPU collectives, 4 devices a process) and its
faults: a SIGTERM that reaches one process only (and the resume, each
process from its own saved data position, equal to the uninterrupted job,
which equals one process on the same mesh), a process killed with kill -9,
and reruns of the identical command into the same model directory."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launch import local
from launch.common import job_command
from moe_jax import distributed
from moe_jax.train import checkpoints
from tests.test_multiprocess import (RUN_FLAGS, ROOT, _free_port, _losses,
                                     _train_one_process,
                                     _train_two_processes)

STEPS = "--gin.TRAIN_STEPS=8"


def _start(model_dir: Path, *flags: str) -> list[subprocess.Popen]:
  """Starts the 2 processes of a training job; each writes its console to
  model_dir.parent / f"{model_dir.name}.<process id>.log"."""
  command = job_command(["train", *RUN_FLAGS, *flags,
                         f"--gin.MODEL_DIR='{model_dir}'"], "env",
                        python=sys.executable)
  port = _free_port()
  processes = []
  for pid in range(2):
    log = open(model_dir.parent / f"{model_dir.name}.{pid}.log", "w")
    processes.append(subprocess.Popen(
        command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **local.process_env(
            pid, 2, 4, port, os.environ.get("XLA_FLAGS", ""))}))
  return processes


def _log(model_dir: Path, pid: int) -> str:
  return (model_dir.parent / f"{model_dir.name}.{pid}.log").read_text()


def _wait_for_step(model_dir: Path, step: int, processes) -> None:
  """Waits until metrics.jsonl holds `step`: both processes are training."""
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline:
    path = model_dir / "metrics.jsonl"
    if path.exists() and step in _losses(model_dir):
      return
    assert all(p.poll() is None for p in processes), _log(model_dir, 0)
    time.sleep(0.05)
  raise AssertionError(f"step {step} not logged in 600 s")


def _stop(processes) -> None:
  for p in processes:
    if p.poll() is None:
      p.kill()
      p.wait()


def test_sigterm_to_one_process_stops_both_and_resumes_exactly(tmp_path):
  # The uninterrupted reference, then the job a SIGTERM stops.
  pytest.importorskip("tasks")
  reference, job = tmp_path / "reference", tmp_path / "job"
  _train_two_processes(reference, STEPS)
  processes = _start(job, STEPS)
  try:
    _wait_for_step(job, 3, processes)
    processes[1].send_signal(signal.SIGTERM)  # one host preempted
    codes = [p.wait(timeout=300) for p in processes]
  finally:
    _stop(processes)
  # Both stop (no hang), exit as if killed by SIGTERM, and leave one
  # checkpoint of the step they stopped at.
  assert codes == [128 + signal.SIGTERM] * 2, _log(job, 0) + _log(job, 1)
  stopped = max(_losses(job))
  assert stopped < 8
  assert checkpoints.steps(job)[-1] == stopped
  assert "stopped early by a signal" in _log(job, 0)
  # Each process saved where its own shard's stream stands.
  tf = pytest.importorskip("tensorflow")
  for pid in range(2):
    prefix = job / checkpoints.DATA_DIR / str(stopped) / f"process_{pid}"
    shards = {name.split("/")[0]
              for name, _ in tf.train.list_variables(str(prefix))
              if name.startswith("shard_")}
    assert shards == {f"shard_{pid}"}, shards

  # The identical command twice: resumes and finishes, then finds it done;
  # never refused as "a different config".
  outs = [_train_two_processes(job, STEPS) for _ in range(2)]
  assert f"resumed from step {stopped}" in outs[0]
  # Both processes continue from their saved positions (no replay), and the
  # losses below show the batches are those of the uninterrupted run.
  assert (f"data position of step {stopped}: restored on 2 of 2 processes\n"
          in outs[0]), outs[0][-3000:]
  assert "resumed from step 8" in outs[1]
  want, got = _losses(reference), _losses(job)
  assert sorted(got) == sorted(want) == list(range(1, 9))
  np.testing.assert_array_equal([got[s] for s in want], list(want.values()))

  # The uninterrupted job is the 1-process job on the same 8-device mesh,
  # up to float summation order across the processes.
  _train_one_process(tmp_path / "single", STEPS)
  alone = _losses(tmp_path / "single")
  assert sorted(alone) == list(range(1, 9))
  np.testing.assert_allclose([want[s] for s in alone], list(alone.values()),
                             rtol=1e-5)
  assert alone[8] != alone[1]


def test_killed_peer_ends_the_survivor_in_bounded_time(tmp_path):
  pytest.importorskip("tasks")
  job = tmp_path / "job"
  processes = _start(job, "--gin.TRAIN_STEPS=100000")
  try:
    _wait_for_step(job, 3, processes)
    processes[1].kill()
    killed = time.monotonic()
    code = processes[0].wait(timeout=120)
    waited = time.monotonic() - killed
  finally:
    _stop(processes)
  out = _log(job, 0)
  # The survivor stops before JAX's heartbeat timeout would end it, with
  # its own exit status and, as its last line, what was lost, when, and the
  # command that resumes.
  assert code == distributed.PEER_LOST_EXIT_CODE, out[-3000:]
  assert waited < distributed.HEARTBEAT_TIMEOUT_S, out[-3000:]
  last = out.strip().splitlines()[-1]
  stop = re.fullmatch(
      rf"moe_jax: process 0 stops \(exit status {code}\): lost process 1 "
      rf"of 2 \(no heartbeat for {distributed.PEER_TIMEOUT_S} s\) during "
      r"step (\d+)\. Rerun the same command to resume from checkpoint "
      rf"(\d+) in {re.escape(str(job))}", last)
  assert stop, out[-3000:]
  step, checkpoint = map(int, stop.groups())
  assert checkpoint == checkpoints.steps(job)[-1] < step, last
  assert step - 1 in _losses(job) and step not in _losses(job), last
