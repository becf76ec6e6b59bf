"""A gs:// model directory end to end (train, resume, eval, inspect) on an
offline fake of Google Cloud Storage (tests/fake_gcs.py): TensorStore and
google-cloud-storage speak HTTP to it, etils.epath reaches it through
fsspec. Nothing is written under the working directory."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests import fake_gcs
from tests.test_main_train import REPO, TASK, _cli
from tests.test_main_train import _clear_gin  # noqa: F401 (autouse)

pytest.importorskip("google.cloud.storage",
                    reason="orbax needs google-cloud-storage for gs://")

# Runs the CLI commands given as a JSON list of argv lists in one process
# using the fake bucket, then inspects the model directory and saves the
# parameters it restores to a local .npz.
_CLIENT = """
import json, sys
import gin
import numpy as np
from tests import fake_gcs
fake_gcs.register_filesystem()
from moe_jax import inspection
from moe_jax.main import main
from moe_jax.param_paths import flat_params
for argv in json.loads(sys.argv[1]):
  gin.clear_config()
  main(argv)
checkpoint = inspection.open_checkpoint(sys.argv[2])
print("inspected step", checkpoint.step)
np.savez(sys.argv[3], **flat_params(checkpoint.params))
"""
# TF's own GCS client cannot be pointed at a fake server; TensorBoard is
# the one writer left out here.
_NO_TENSORBOARD = ["--gin.run.TrainConfig.tensorboard=False",
                   "--gin.run.TrainConfig.save_every=2"]


@pytest.fixture
def bucket(tmp_path):
  server = fake_gcs.FakeGcsServer(tmp_path / "gcs").start()
  yield server
  server.shutdown()


def _steps(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines()]


def _unwrapped(path):
  """The file's text with gin's line continuations joined: gin wraps a long
  value (the long local path) where it leaves a short one (gs://...) alone."""
  return re.sub(r"\\\n\s*", "", path.read_text())


def test_gs_model_dir_trains_resumes_evaluates_and_inspects(tmp_path, bucket):
  model_dir = "gs://bucket/run"
  train = [*_NO_TENSORBOARD, "--gin.EVAL_MIXTURE=None"]
  commands = [["train", *_cli(model_dir, "--gin.TRAIN_STEPS=2", *train)],
              ["train", *_cli(model_dir, "--gin.TRAIN_STEPS=4", *train)],
              ["eval", *_cli(model_dir, *_NO_TENSORBOARD)]]
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  env = {**os.environ, **bucket.client_env(),
         "PYTHONPATH": os.pathsep.join(
             [str(REPO), os.environ.get("PYTHONPATH", "")])}
  done = subprocess.run(
      [sys.executable, "-c", _CLIENT, json.dumps(commands), model_dir,
       str(tmp_path / "inspected.npz")],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert not list(cwd.iterdir())  # no local '<cwd>/gs:/bucket/run'
  assert "resumed from step 2" in done.stdout

  # The reference: the same run uninterrupted in a local directory.
  from moe_jax import inspection
  from moe_jax.main import main
  from moe_jax.param_paths import flat_params
  from moe_jax.train import checkpoints
  local = tmp_path / "local"
  main(["train", *_cli(local, "--gin.TRAIN_STEPS=4", *train)])
  stored = tmp_path / "gcs" / "bucket" / "run"
  remote_metrics = _steps((stored / "metrics.jsonl").read_text())
  local_metrics = _steps((local / "metrics.jsonl").read_text())
  assert [m["step"] for m in remote_metrics] == [1, 2, 3, 4]
  assert [m["loss"] for m in remote_metrics] == [
      m["loss"] for m in local_metrics]
  assert sorted(int(p.name) for p in (stored / "checkpoints").iterdir()
                ) == checkpoints.steps(local)
  assert _unwrapped(stored / "config.gin") == _unwrapped(
      local / "config.gin").replace(str(local), model_dir)
  evaluated = json.loads((stored / "eval" / "metrics_4.json").read_text())
  assert evaluated["step"] == 4 and TASK in evaluated["metrics"]

  assert "inspected step 4" in done.stdout
  reference = flat_params(inspection.open_checkpoint(local).params)
  with np.load(tmp_path / "inspected.npz") as inspected:
    assert sorted(inspected.files) == sorted(reference)
    for path, value in reference.items():
      np.testing.assert_array_equal(inspected[path], np.asarray(value))
