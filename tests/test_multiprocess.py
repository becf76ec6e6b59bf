"""Multi-host behaviour on one machine: data shards per process, and the
helpers of the real 2-process jobs (launch/local.py, CPU collectives,
expert parallelism across the two processes) that
test_multiprocess_faults.py runs, checkpoints, stops, resumes and holds
equal to a 1-process run on the same 8-device mesh."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_jax.train.data import BatchStream, DataConfig

ROOT = Path(__file__).resolve().parent.parent

# The embedded default, shrunk: 8 experts over expert=4, data=2 (8 devices),
# the MoE layers expert-parallel inside shard_map.
RUN_FLAGS = (
    "--gin_file=gin/runs/mini_flan_cpu.gin",
    "--gin_file=gin/partitioning/expert_parallel_shard_map.gin",
    "--gin.BATCH_SIZE=8",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
    "--gin.EVAL_MIXTURE=None",
    "--gin.EMBED_DIM=32",
    "--gin.MLP_DIM=64",
    "--gin.data.DataConfig.num_shards=2",
    "--gin.partitioning.make_mesh.expert=4",
    "--gin.run.TrainConfig.log_every=1",
    "--gin.run.TrainConfig.save_every=2",
    "--gin.run.TrainConfig.async_checkpointing=False",
)


def _stream(process_index, process_count, num_shards=2):
  tasks = pytest.importorskip("tasks")
  del tasks  # registers mini_flan
  config = DataConfig(mixture_or_task_name="mini_flan",
                      task_feature_lengths={"inputs": 32, "targets": 8},
                      batch_size=8, num_shards=num_shards)
  return BatchStream(config, process_index, process_count)


def test_processes_read_disjoint_shards_that_make_the_global_batch():
  # One stream per process count and process, each asked for steps in order.
  whole, parts = _stream(0, 1), [_stream(p, 2) for p in range(2)]
  for step in (0, 3):
    whole_batch = whole(step)
    part_batches = [part(step) for part in parts]
    for key in whole_batch:
      np.testing.assert_array_equal(
          np.concatenate([part[key] for part in part_batches]),
          whole_batch[key])
    rows = [{bytes(row) for row in part["encoder_input_tokens"]}
            for part in part_batches]
    assert not rows[0] & rows[1], "the two processes share examples"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(args, env=None):
  result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
  return result.stdout


def _losses(model_dir: Path) -> dict[int, float]:
  lines = (model_dir / "metrics.jsonl").read_text().splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _train_two_processes(model_dir: Path, *flags: str) -> str:
  return _run(["launch/local.py", "--num_processes=2",
               "--devices_per_process=4", f"--port={_free_port()}", "--",
               "train", *RUN_FLAGS, *flags, f"--gin.MODEL_DIR='{model_dir}'"])


def _train_one_process(model_dir: Path, *flags: str) -> str:
  """The same job in one process on 8 fake devices (the same mesh)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": (
      os.environ.get("XLA_FLAGS", "") +
      " --xla_force_host_platform_device_count=8")}
  return _run(["-m", "moe_jax.main", "train", *RUN_FLAGS, *flags,
               f"--gin.MODEL_DIR='{model_dir}'"], env=env)
