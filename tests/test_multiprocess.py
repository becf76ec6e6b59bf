"""Multi-host behaviour on one machine: data shards per process, and a real
2-process job (launch/local.py, CPU collectives) that checkpoints, restarts
and matches a 1-process run on the same 8-device mesh, with expert
parallelism across the two processes."""

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


def _stream(process_index, process_count, step, num_shards=2):
  tasks = pytest.importorskip("tasks")
  del tasks  # registers mini_flan
  config = DataConfig(mixture_or_task_name="mini_flan",
                      task_feature_lengths={"inputs": 32, "targets": 8},
                      batch_size=8, num_shards=num_shards)
  return BatchStream(config, process_index, process_count)(step)


def test_processes_read_disjoint_shards_that_make_the_global_batch():
  for step in (0, 3):
    whole = _stream(0, 1, step)
    parts = [_stream(p, 2, step) for p in range(2)]
    for key in whole:
      np.testing.assert_array_equal(
          np.concatenate([part[key] for part in parts]), whole[key])
    rows = [{bytes(row) for row in part["encoder_input_tokens"]}
            for part in parts]
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


def test_two_processes_resume_and_match_one_process(tmp_path):
  pytest.importorskip("tasks")
  multi, single = tmp_path / "multi", tmp_path / "single"
  _train_two_processes(multi, "--gin.TRAIN_STEPS=2")
  assert (multi / "checkpoints" / "2").is_dir()
  # A new job that trains on: restores step 2 (a longer run is another
  # config, hence overwrite_config).
  out = _train_two_processes(multi, "--gin.TRAIN_STEPS=4",
                             "--gin.run.TrainConfig.overwrite_config=True")
  assert "resumed from step 2" in out

  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": (
      os.environ.get("XLA_FLAGS", "") +
      " --xla_force_host_platform_device_count=8")}
  _run(["-m", "moe_jax.main", "train", *RUN_FLAGS, "--gin.TRAIN_STEPS=4",
        f"--gin.MODEL_DIR='{single}'"], env=env)

  want, got = _losses(single), _losses(multi)
  assert sorted(want) == [1, 2, 3, 4]
  assert sorted(got) == [1, 2, 3, 4]  # steps 3-4 come from the restarted job
  np.testing.assert_allclose([got[s] for s in want], list(want.values()),
                             rtol=1e-5)
  assert want[4] != want[1]
