"""Faults of a training run and its model directory: each either recovers
with nothing lost or stops with an error naming the step, file or knob
(docs/reliability.md lists them)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from moe_jax.models import build_model
from moe_jax.train import checkpoints, loop, objective, optimizers
from moe_jax.train.metrics_log import METRICS_FILE, MetricsLogger
from tests.test_train_loop import batch_fn, run, tiny_model

REPO = Path(__file__).resolve().parent.parent
CONFIG = textwrap.dedent("""\
    NUM_EXPERTS = 4
    TRAIN_STEPS = {steps}
    MODEL_DIR = {model_dir!r}
    run.TrainConfig.model_dir = %MODEL_DIR
    run.TrainConfig.num_steps = %TRAIN_STEPS
    run.TrainConfig.log_every = 3
    optimizers.OptimizerConfig.total_steps = %TRAIN_STEPS
    """)


def config(steps=4, model_dir="/a", **changes):
  text = CONFIG.format(steps=steps, model_dir=model_dir)
  for old, new in changes.items():
    text = text.replace(old, new)
  return text


def test_a_longer_run_or_a_moved_directory_resumes(tmp_path):
  run(tmp_path / "a", 2, config_text=config())
  (tmp_path / "a").rename(tmp_path / "b")
  resumed = run(tmp_path / "b", 4, config_text=config(
      steps=6, model_dir=str(tmp_path / "b"), **{
          "log_every = 3": "log_every = 5"}))
  assert resumed.resumed_from == 2
  assert "TRAIN_STEPS = 6" in (tmp_path / "b" / "config.gin").read_text()


def test_a_refused_config_says_what_differs(tmp_path):
  run(tmp_path, 1, config_text=config())
  with pytest.raises(ValueError) as refused:
    run(tmp_path, 2, config_text=config(**{"NUM_EXPERTS = 4":
                                           "NUM_EXPERTS = 8"}))
  message = str(refused.value)
  assert "-NUM_EXPERTS = 4\n+NUM_EXPERTS = 8" in message
  assert "TRAIN_STEPS" not in message
  assert "run.TrainConfig.overwrite_config=True" in message


def test_a_failed_restore_leaves_config_gin_as_it_was(tmp_path):
  """overwrite_config with a model that does not fit the checkpoint: the
  error names the step; config.gin still describes the checkpoints, so the
  original command resumes."""
  run(tmp_path, 2, config_text="four experts")
  wider = optimizers.make_optimizer(optimizers.OptimizerConfig(
      name="adamw", learning_rate=1e-2))
  ckpt = checkpoints.Checkpointer(str(tmp_path), "other experts",
                                  save_every=2, overwrite_config=True)
  model = build_model(dataclasses.replace(tiny_model().config, emb_dim=24))
  with pytest.raises(ValueError, match="checkpoint of step 2 .* could not be"
                     " restored"):
    loop.train(model, wider, objective.LossConfig(), batch_fn, 4, ckpt)
  ckpt.close()
  assert (tmp_path / "config.gin").read_text() == "four experts"
  assert run(tmp_path, 3, config_text="four experts").resumed_from == 2


def test_a_failed_first_step_writes_no_config(tmp_path):
  calls = []

  def broken_batches(step):  # the first call initializes, the second fails
    calls.append(step)
    if len(calls) > 1:
      raise ValueError("bad knob found while tracing")
    return batch_fn(step)
  ckpt = checkpoints.Checkpointer(str(tmp_path), "bad", save_every=2)
  optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig())
  with pytest.raises(ValueError, match="bad knob"):
    loop.train(tiny_model(), optimizer, objective.LossConfig(),
               broken_batches, 2, ckpt)
  ckpt.close()
  assert not (tmp_path / "config.gin").exists()
  assert run(tmp_path, 1, config_text="fixed").resumed_from is None


@pytest.mark.parametrize("damage", ["metadata", "array data"])
def test_a_truncated_checkpoint_names_its_step_and_the_fallback(tmp_path,
                                                               damage):
  run(tmp_path, 4)
  item = tmp_path / checkpoints.CHECKPOINTS_DIR / "4" / "default"
  if damage == "metadata":
    victims = [item / "_METADATA"]
  else:  # every data file: which one holds the arrays varies from run to run
    victims = [p for p in item.rglob("*") if p.is_file() and
               p.parent.name == "d"]
  for victim in victims:
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
  step_dir = tmp_path / checkpoints.CHECKPOINTS_DIR / "4"
  with pytest.raises(ValueError, match=rf"(?s)step 4 .*rm -r {step_dir}"):
    run(tmp_path, 6)
  os.system(f"rm -r {step_dir}")
  assert run(tmp_path, 6).resumed_from == 2


def test_an_exploding_run_keeps_only_checkpoints_with_a_finite_loss(
    tmp_path):
  """learning_rate 1e30: parameters explode after one update, so the loss
  of step 2 is NaN. Checkpoint 1 holds those parameters: it is deleted,
  and resuming with a sane rate trains on finite losses."""
  def optimizer(rate):
    return optimizers.make_optimizer(optimizers.OptimizerConfig(
        name="adamw", learning_rate=rate, warmup_steps=0,
        schedule="constant"))
  ckpt = checkpoints.Checkpointer(str(tmp_path), "x", save_every=1,
                                  async_save=False)
  with pytest.raises(loop.NonFiniteLossError) as error:
    loop.train(tiny_model(), optimizer(1e30), objective.LossConfig(),
               batch_fn, 6, ckpt)
  ckpt.close()
  bad_step = int(str(error.value).split("parameters after step ")[1][:1])
  assert f"Deleted checkpoint {bad_step}" in str(error.value)
  assert bad_step not in checkpoints.steps(tmp_path)
  ckpt = checkpoints.Checkpointer(str(tmp_path), "x", save_every=1,
                                  overwrite_config=True)
  resumed = loop.train(tiny_model(), optimizer(1e-3), objective.LossConfig(),
                       batch_fn, bad_step + 2, ckpt)
  ckpt.close()
  assert resumed.resumed_from == (bad_step - 1 or None)
  assert all(np.isfinite(h["loss"]) for h in resumed.history)


_KILLED_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from moe_jax.train.metrics_log import MetricsLogger
    import tests.test_train_loop as t
    from moe_jax.train import checkpoints, loop, objective, optimizers
    slow = t.batch_fn
    def batch_fn(step):
      time.sleep({delay})
      return slow(step)
    ckpt = checkpoints.Checkpointer({model_dir!r}, "tiny", save_every=3)
    logger = MetricsLogger({model_dir!r}, 8, 1, None, log_every=10)
    optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig(
        name="adamw", learning_rate=1e-2, warmup_steps=2))
    loop.train(t.tiny_model(), optimizer, objective.LossConfig(), batch_fn,
               8, ckpt, seed=7, on_step=logger)
    logger.close()
    ckpt.close()
""")


def _train_in_subprocess(model_dir, delay):
  script = _KILLED_RUN.format(repo=str(REPO), model_dir=str(model_dir),
                              delay=delay)
  return subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _records(model_dir):
  lines = (model_dir / METRICS_FILE).read_text().splitlines()
  return [json.loads(line) for line in lines]


def test_kill_9_between_log_lines_loses_no_metrics(tmp_path):
  """save_every=3, log_every=10: killed after checkpoint 3, the resumed
  run's metrics.jsonl holds steps 1-8 once each (the losses are those of
  an uninterrupted run: test_train_loop checks exact resume)."""
  process = _train_in_subprocess(tmp_path / "killed", 0.5)
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None and not any(
      s >= 3 for s in checkpoints.steps(tmp_path / "killed")):
    time.sleep(0.1)
  assert process.poll() is None, process.stdout.read()
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  resumed = _train_in_subprocess(tmp_path / "killed", 0)
  out = resumed.communicate(timeout=300)[0]
  assert resumed.returncode == 0, out
  assert [r["step"] for r in _records(tmp_path / "killed")] == list(
      range(1, 9))


def test_metrics_of_rerun_steps_and_a_cut_line_are_replaced(tmp_path):
  (tmp_path / METRICS_FILE).write_text(
      "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
      + '{"step": 4, "lo')
  logger = MetricsLogger(str(tmp_path), 4, 1, None)
  logger(3, {"loss": 2.0, "cross_entropy": 2.0})
  logger(4, {"loss": 3.0, "cross_entropy": 3.0})
  logger.close()
  assert [(r["step"], r["loss"]) for r in _records(tmp_path)] == [
      (1, 1.0), (2, 1.0), (3, 2.0), (4, 3.0)]
