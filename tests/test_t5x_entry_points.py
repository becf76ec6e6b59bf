"""T5X's own entry points (`python -m t5x.train / t5x.eval / t5x.infer`) on
the project's gin/t5x files: a 2-step CPU run of the tiny sparse T5 on
mini_flan, then eval (predict and score) and infer from its checkpoint.
Skips without t5x."""

import json
import os
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest

from moe_jax.moe import metric_names
from moe_jax.t5x.losses import METRIC_PREFIX

t5x = pytest.importorskip("t5x.train")

REPO = Path(__file__).resolve().parents[1]
T5X_ROOT = Path(t5x.__file__).resolve().parents[1]  # holds t5x/configs/
STEPS = 2
# Large enough that the routing terms dominate float32 rounding of the loss.
AUX, ROUTER_Z = 0.5, 0.25


def run_t5x(entry: str, gin_file: str, *bindings: str) -> str:
  """Runs `python -m t5x.<entry>` from the repository; returns its log."""
  command = [sys.executable, "-m", f"t5x.{entry}",
             f"--gin_search_paths=.,{T5X_ROOT}",
             f"--gin_file=gin/t5x/{gin_file}", "--alsologtostderr"]
  command += [f"--gin.{binding}" for binding in bindings]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-6000:]
  return result.stderr


def summaries(events_dir: Path) -> dict[str, dict[int, float]]:
  """{tag: {step: scalar}} of the float summaries (not the gin-config
  text) in T5X's TensorBoard events in events_dir."""
  from tensorboard.backend.event_processing import event_accumulator
  import tensorflow as tf
  acc = event_accumulator.EventAccumulator(
      str(events_dir), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  values = {tag: {e.step: tf.make_ndarray(e.tensor_proto)
                  for e in acc.Tensors(tag)}
            for tag in acc.Tags()["tensors"]}
  return {tag: {step: float(v) for step, v in by_step.items()}
          for tag, by_step in values.items()
          if all(v.dtype.kind == "f" for v in by_step.values())}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A T5X model dir after STEPS training steps (no training eval)."""
  path = tmp_path_factory.mktemp("t5x_train")
  run_t5x("train", "mini_flan_tiny_moe.gin", f"MODEL_DIR='{path}'",
          f"TRAIN_STEPS={STEPS}", f"AUX_LOSS_FACTOR={AUX}",
          f"ROUTER_Z_LOSS_FACTOR={ROUTER_Z}",
          "train.train_eval_dataset_cfg=None")
  return path


def test_train_writes_checkpoints(model_dir):
  assert (model_dir / "checkpoint_0").is_dir()
  assert (model_dir / f"checkpoint_{STEPS}").is_dir()


def test_train_summaries_hold_routing_metrics_and_loss(model_dir):
  train = summaries(model_dir / "train")
  at = {tag: values[STEPS] for tag, values in train.items()
        if STEPS in values}
  for name in metric_names.SCALAR_METRICS:
    assert np.isfinite(at[METRIC_PREFIX + name]), name
  routing = (AUX * at[METRIC_PREFIX + metric_names.AUXILIARY_LOSS] +
             ROUTER_Z * at[METRIC_PREFIX + metric_names.ROUTER_Z_LOSS])
  assert routing > 0.5
  # T5X: cross_ent_loss = task loss - z_loss; the optimized loss adds the
  # weighted routing terms on top.
  np.testing.assert_allclose(
      at["loss"], at["cross_ent_loss"] + at["z_loss"] + routing, rtol=1e-5)


@pytest.mark.parametrize("task, metric", [
    ("mini_flan_add_zs", "exact_match"),       # predict: beam search
    ("mini_flan_sign_rank", "rank_accuracy")])  # score: rank classification
def test_eval_restores_the_checkpoint_and_writes_metrics(model_dir, task,
                                                          metric):
  out = model_dir / f"eval_{task}"
  run_t5x("eval", "eval_tiny_moe.gin", f"MIXTURE_OR_TASK_NAME='{task}'",
          f"CHECKPOINT_PATH='{model_dir}/checkpoint_{STEPS}'",
          f"EVAL_OUTPUT_DIR='{out}'")
  lines = (out / f"inference_eval/{task}-metrics.jsonl").read_text()
  record = json.loads(lines.splitlines()[-1])
  assert 0.0 <= record[metric] <= 100.0


def test_infer_writes_predictions(model_dir):
  out = model_dir / "infer"
  run_t5x("infer", "infer_tiny_moe.gin",
          "MIXTURE_OR_TASK_NAME='mini_flan_add_zs'",
          f"CHECKPOINT_PATH='{model_dir}/checkpoint_{STEPS}'",
          f"INFER_OUTPUT_DIR='{out}'")
  predictions = out / "mini_flan_add_zs-predict.jsonl-00000-of-00001"
  rows = [json.loads(line) for line in predictions.read_text().splitlines()]
  assert rows and all("prediction" in row for row in rows)
