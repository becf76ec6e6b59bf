"""T5X's own entry points (`python -m t5x.train / t5x.eval / t5x.infer`) on
the project's gin/t5x files, on CPU with short sequences:

- the tiny sparse T5, unrolled: 3 training steps (checkpoints 0, 2, 3), a
  restart from its step-2 checkpoint, eval (predict and score);
- the same model with scanned layers: 2 steps, then eval (predict: T5X's
  beam search over the scanned cache);
- the tiny sparse decoder-only model: 2 steps, then infer (prefix LM).

The runs are shared by the assertions and run RUNS_AT_ONCE at a time. Skips
without t5x."""

from concurrent import futures
import dataclasses
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest

from moe_jax.moe import metric_names
from moe_jax.t5x.losses import METRIC_PREFIX

t5x = pytest.importorskip("t5x.train")

REPO = Path(__file__).resolve().parents[1]
T5X_ROOT = Path(t5x.__file__).resolve().parents[1]  # holds t5x/configs/
RUNS_AT_ONCE = 3
SHORT = "TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}"
# Large enough that the routing terms dominate float32 rounding of the loss.
AUX, ROUTER_Z = 0.5, 0.25
STEPS, RESUME_FROM = 3, 2


@dataclasses.dataclass(frozen=True)
class Train:
  gin_file: str
  steps: int
  model: tuple[str, ...] = ()     # bindings of the model, for later runs too
  training: tuple[str, ...] = ()  # bindings of this training run only


TRAINS = {
    "unrolled": Train("mini_flan_tiny_moe.gin", STEPS, training=(
        # Deterministic and resumable: fixed seeds, the dataset iterator in
        # the checkpoints, a checkpoint at RESUME_FROM.
        "RANDOM_SEED=0", "train/utils.DatasetConfig.seed=0",
        "utils.SaveCheckpointConfig.save_dataset=True",
        f"utils.SaveCheckpointConfig.period={RESUME_FROM}")),
    "scanned": Train("mini_flan_tiny_moe.gin", 2, model=("SCAN_LAYERS=True",)),
    "decoder_only": Train("mini_flan_decoder_only_tiny_moe.gin", 2),
}


def train_command(train: Train, model_dir: Path) -> list[str]:
  return t5x_command("train", train.gin_file, (
      f"MODEL_DIR='{model_dir}'", f"TRAIN_STEPS={train.steps}",
      f"AUX_LOSS_FACTOR={AUX}", f"ROUTER_Z_LOSS_FACTOR={ROUTER_Z}",
      "train.train_eval_dataset_cfg=None", *train.model, *train.training))


def t5x_command(entry: str, gin_file: str, bindings) -> list[str]:
  return ([sys.executable, "-m", f"t5x.{entry}",
           f"--gin_search_paths=.,{T5X_ROOT}",
           f"--gin_file=gin/t5x/{gin_file}", "--alsologtostderr"] +
          [f"--gin.{binding}" for binding in (SHORT, *bindings)])


def run_all(commands: dict) -> dict[str, str]:
  """Runs {name: command} from the repository, RUNS_AT_ONCE at a time;
  returns {name: log}. Fails on the first run that exits non-zero."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")

  def run(command):
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)

  with futures.ThreadPoolExecutor(RUNS_AT_ONCE) as pool:
    results = dict(zip(commands, pool.map(run, commands.values())))
  failed = {name: result.stderr[-3000:] for name, result in results.items()
            if result.returncode != 0}
  assert not failed, failed
  return {name: result.stderr for name, result in results.items()}


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
def trained(tmp_path_factory) -> dict[str, Path]:
  """{name in TRAINS: its T5X model dir after training (no training eval)}."""
  dirs = {name: tmp_path_factory.mktemp(f"t5x_{name}") for name in TRAINS}
  run_all({name: train_command(train, dirs[name])
           for name, train in TRAINS.items()})
  return dirs


@pytest.fixture(scope="module")
def followups(trained, tmp_path_factory) -> dict[str, Path]:
  """The runs that read the trained checkpoints; {name: output dir}.

  "resumed": a model dir holding only the unrolled run's step-RESUME_FROM
  checkpoint, trained again to STEPS (a restarted job).
  """
  out = {name: tmp_path_factory.mktemp(name) for name in (
      "resumed", "predict", "score", "predict_scanned",
      "infer_decoder_only")}
  shutil.copytree(trained["unrolled"] / f"checkpoint_{RESUME_FROM}",
                  out["resumed"] / f"checkpoint_{RESUME_FROM}")

  def checkpoint(name):
    return (f"CHECKPOINT_PATH='{trained[name]}/checkpoint_"
            f"{TRAINS[name].steps}'", *TRAINS[name].model)

  def evaluate(name, task, trained_name="unrolled"):
    return t5x_command("eval", "eval_tiny_moe.gin", (
        f"MIXTURE_OR_TASK_NAME='{task}'", *checkpoint(trained_name),
        f"EVAL_OUTPUT_DIR='{out[name]}'"))

  def infer(name, gin_file, trained_name):
    return t5x_command("infer", gin_file, (
        "MIXTURE_OR_TASK_NAME='mini_flan_add_zs'", *checkpoint(trained_name),
        f"INFER_OUTPUT_DIR='{out[name]}'"))

  run_all({
      "resumed": train_command(TRAINS["unrolled"], out["resumed"]),
      "predict": evaluate("predict", "mini_flan_add_zs"),   # beam search
      "score": evaluate("score", "mini_flan_sign_rank"),    # rank options
      "predict_scanned": evaluate("predict_scanned", "mini_flan_add_zs",
                                  "scanned"),
      "infer_decoder_only": infer("infer_decoder_only",
                                  "infer_decoder_only_tiny_moe.gin",
                                  "decoder_only"),
  })
  return out


def final_summaries(model_dir: Path, step: int) -> dict[str, float]:
  return {tag: values[step] for tag, values in
          summaries(model_dir / "train").items() if step in values}


@pytest.mark.parametrize("name", sorted(TRAINS))
def test_train_writes_checkpoints(trained, name):
  steps = TRAINS[name].steps
  assert (trained[name] / "checkpoint_0").is_dir()
  assert (trained[name] / f"checkpoint_{steps}").is_dir()


@pytest.mark.parametrize("name", sorted(TRAINS))
def test_train_summaries_hold_routing_metrics_and_loss(trained, name):
  at = final_summaries(trained[name], TRAINS[name].steps)
  for metric in metric_names.SCALAR_METRICS:
    assert np.isfinite(at[METRIC_PREFIX + metric]), metric
  routing = (AUX * at[METRIC_PREFIX + metric_names.AUXILIARY_LOSS] +
             ROUTER_Z * at[METRIC_PREFIX + metric_names.ROUTER_Z_LOSS])
  assert routing > 0.5
  # T5X: cross_ent_loss = task loss - z_loss; the optimized loss adds the
  # weighted routing terms on top.
  np.testing.assert_allclose(
      at["loss"], at["cross_ent_loss"] + at["z_loss"] + routing, rtol=1e-5)


def test_restart_resumes_from_the_checkpoint(trained, followups):
  resumed = followups["resumed"]
  assert (resumed / f"checkpoint_{STEPS}").is_dir()
  restore = summaries(resumed / "train")["timing/init_or_restore_seconds"]
  assert list(restore) == [RESUME_FROM]  # the restored step
  # Same parameters, optimizer state, data position and rngs: the step the
  # restarted job trains is the one the uninterrupted run trained.
  after = final_summaries(resumed, STEPS)
  uninterrupted = final_summaries(trained["unrolled"], STEPS)
  for tag in ("loss", "cross_ent_loss",
              METRIC_PREFIX + metric_names.AUXILIARY_LOSS):
    np.testing.assert_allclose(after[tag], uninterrupted[tag], rtol=1e-6,
                               err_msg=tag)


@pytest.mark.parametrize("name, task, metric", [
    ("predict", "mini_flan_add_zs", "exact_match"),
    ("score", "mini_flan_sign_rank", "rank_accuracy"),
    ("predict_scanned", "mini_flan_add_zs", "exact_match")])
def test_eval_restores_the_checkpoint_and_writes_metrics(followups, name,
                                                          task, metric):
  lines = (followups[name] / f"inference_eval/{task}-metrics.jsonl")
  record = json.loads(lines.read_text().splitlines()[-1])
  assert 0.0 <= record[metric] <= 100.0


def test_infer_writes_predictions(followups):
  predictions = (followups["infer_decoder_only"] /
                 "mini_flan_add_zs-predict.jsonl-00000-of-00001")
  rows = [json.loads(line) for line in predictions.read_text().splitlines()]
  assert len(rows) == 100  # the task's test split
  assert all(isinstance(row["prediction"], str) for row in rows)
