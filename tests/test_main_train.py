"""The main job end to end: gin run files, exact resume, SIGTERM, eval and
infer outputs, saved config, partial initialization, bad knobs."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

import tasks  # noqa: F401  (registers mini_flan)
from moe_jax import gin_utils
from moe_jax.main import main
from moe_jax.models import MoeConfig, TransformerConfig
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter
from moe_jax.train import checkpoints
from moe_jax.train import run as run_lib
from moe_jax.train import step as train_step
from moe_jax.train import warm_start
from moe_jax.train.data import ArrayStream, DataConfig
from moe_jax.train.evaluation import EvalConfig
from moe_jax.train.optimizers import OptimizerConfig

REPO = Path(__file__).resolve().parent.parent
RUN_FILE = "gin/runs/mini_flan_cpu.gin"
LENGTHS = {"inputs": 32, "targets": 8}
TASK = "mini_flan_parity_zs"
# A run small enough for tests: two tiny sparse layers, a single task.
TINY = ["--gin.EMBED_DIM=16", "--gin.MLP_DIM=32", "--gin.NUM_HEADS=2",
        "--gin.HEAD_DIM=8", "--gin.NUM_EXPERTS=4", "--gin.BATCH_SIZE=4",
        f"--gin.MIXTURE='{TASK}'", f"--gin.EVAL_MIXTURE='{TASK}'",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
        "--gin.evaluation.EvalConfig.num_examples=8",
        "--gin.evaluation.EvalConfig.batch_size=4"]


@pytest.fixture(autouse=True)
def _clear_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def tiny_run(model_dir, num_steps, **train) -> run_lib.Run:
  moe = MoeConfig(layer=MoeLayer(
      router=TokenChoiceRouter(num_selected_experts=2), num_experts=4,
      min_expert_capacity=1))
  model = TransformerConfig(
      vocab_size=259, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
      num_encoder_layers=2, num_decoder_layers=2, encoder_moe=moe,
      decoder_moe=moe, dropout_rate=0.1)
  return run_lib.Run(
      model=model,
      train=run_lib.TrainConfig(model_dir=str(model_dir), num_steps=num_steps,
                                save_every=2, async_checkpointing=False,
                                **train),
      data=DataConfig(TASK, LENGTHS, batch_size=4),
      optimizer=OptimizerConfig(learning_rate=0.01, warmup_steps=2),
      config_text="tiny")


def test_resumed_run_is_bitwise_identical(tmp_path):
  whole = run_lib.train(tiny_run(tmp_path / "whole", 6))
  run_lib.train(tiny_run(tmp_path / "parts", 3))
  resumed = run_lib.train(tiny_run(tmp_path / "parts", 6))
  assert resumed.loop.resumed_from == 3
  assert [h["step"] for h in resumed.loop.history] == [4, 5, 6]
  assert [h["loss"] for h in resumed.loop.history] == [
      h["loss"] for h in whole.loop.history[3:]]
  for a, b in zip(jax.tree.leaves(whole.loop.state.params),
                  jax.tree.leaves(resumed.loop.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  lines = (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == list(range(1, 7))


def test_batches_read_before_train_and_resume_as_the_pipeline(tmp_path):
  piped = run_lib.train(tiny_run(tmp_path / "piped", 6))
  stream = ArrayStream.read(tiny_run(tmp_path, 6).data, 6)
  whole = run_lib.train(tiny_run(tmp_path / "whole", 6), stream)
  run_lib.train(tiny_run(tmp_path / "parts", 3), stream)
  resumed = run_lib.train(tiny_run(tmp_path / "parts", 6), stream)
  losses = [h["loss"] for h in piped.loop.history]
  assert [h["loss"] for h in whole.loop.history] == losses
  assert resumed.loop.resumed_from == 3
  assert [h["loss"] for h in resumed.loop.history] == losses[3:]
  for a, b in zip(jax.tree.leaves(piped.loop.state.params),
                  jax.tree.leaves(resumed.loop.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = tiny_run(tmp_path / "other", 6)
  other = dataclasses.replace(other, data=dataclasses.replace(other.data,
                                                              seed=1))
  with pytest.raises(ValueError, match="another data config"):
    run_lib.train(other, stream)


def test_runs_of_one_program_trace_it_once(tmp_path, monkeypatch):
  # A study runs many jobs of one model, optimizer and loss in a process:
  # the train step is traced for the first only, and reusing it changes
  # nothing in what a run computes.
  run_lib._programs.cache_clear()
  traces = []
  traced = train_step.loss_fn

  def counted(*args, **kwargs):
    traces.append(1)
    return traced(*args, **kwargs)

  monkeypatch.setattr(train_step, "loss_fn", counted)
  first = run_lib.train(tiny_run(tmp_path / "first", 3))
  again = run_lib.train(tiny_run(tmp_path / "again", 3))
  other_seed = run_lib.train(tiny_run(tmp_path / "other", 3, seed=1))
  assert len(traces) == 1
  assert [h["loss"] for h in again.loop.history] == [
      h["loss"] for h in first.loop.history]
  for a, b in zip(jax.tree.leaves(first.loop.state.params),
                  jax.tree.leaves(again.loop.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [h["loss"] for h in other_seed.loop.history] != [
      h["loss"] for h in first.loop.history]
  run_lib._programs.cache_clear()
  fresh = run_lib.train(tiny_run(tmp_path / "fresh", 3))
  assert len(traces) == 2
  assert [h["loss"] for h in fresh.loop.history] == [
      h["loss"] for h in first.loop.history]


def test_partial_initialization_by_name(tmp_path):
  source = run_lib.train(tiny_run(tmp_path / "source", 2)).loop.state.params
  fresh = jax.tree.map(np.zeros_like, jax.tree.map(np.asarray, source))
  filled, copied = warm_start.init_params_from(
      fresh, jax.tree.map(np.asarray, source), warm_start.InitMode.MATCHING,
      r"encoder/.*")
  assert copied and all(name.startswith("encoder/") for name in copied)
  np.testing.assert_array_equal(filled["encoder"]["final_norm"]["scale"],
                                source["encoder"]["final_norm"]["scale"])
  assert not np.any(filled["decoder"]["final_norm"]["scale"])
  # Through the trainer: a new run starts from the source's parameters.
  started = run_lib.train(tiny_run(
      tmp_path / "finetune", 1, init_checkpoint=str(tmp_path / "source")))
  assert started.loop.resumed_from is None


def _cli(model_dir, *extra):
  return [f"--gin_file={RUN_FILE}", *TINY,
          f"--gin.MODEL_DIR='{model_dir}'", *extra]


def test_train_eval_infer_commands(tmp_path, capsys):
  model_dir = tmp_path / "run"
  main(["train", *_cli(model_dir, "--gin.TRAIN_STEPS=4")])
  out = capsys.readouterr().out
  assert "run summary" in out and "cross entropy" in out
  evaluated = json.loads((model_dir / "eval" / "metrics_4.json").read_text())
  accuracy = evaluated["metrics"][TASK]["exact_match"]
  # eval of the same step again: a new file, the first one kept.
  main(["eval", *_cli(model_dir)])
  assert json.loads((model_dir / "eval" / "metrics_4.json").read_text()
                    ) == evaluated
  assert json.loads((model_dir / "eval" / "metrics_4.1.json").read_text()
                    )["metrics"] == evaluated["metrics"]

  # The saved config re-parses on its own and describes the same run.
  gin_utils.parse([str(model_dir / "config.gin")])
  again = run_lib.configured_run()
  assert again.data.mixture_or_task_name == TASK
  assert again.model.emb_dim == 16 and again.train.num_steps == 4

  predictions = tmp_path / "pred.jsonl"
  main(["infer", *_cli(model_dir), f"--task={TASK}", "--num_examples=8",
        f"--output={predictions}"])
  records = [json.loads(l) for l in predictions.read_text().splitlines()]
  assert len(records) == 8 and all("prediction" in r for r in records)
  hits = np.mean([r["prediction"] == r["targets"] for r in records])
  assert accuracy == pytest.approx(100 * hits)

  text_inputs = tmp_path / "inputs.txt"
  text_inputs.write_text("Is 12 even or odd?\nIs 7 even or odd?\n")
  main(["infer", *_cli(model_dir), f"--input_file={text_inputs}",
        f"--output={predictions}"])
  assert [json.loads(l)["inputs"] for l in
          predictions.read_text().splitlines()] == ["Is 12 even or odd?",
                                                   "Is 7 even or odd?"]


def test_malformed_jsonl_input_names_the_line(tmp_path):
  from moe_jax import infer
  bad = tmp_path / "in.jsonl"
  bad.write_text('{"inputs": "a"}\n{"inputs": \n')
  with pytest.raises(ValueError, match=r"in.jsonl:2"):
    infer.read_inputs(str(bad))


@pytest.mark.parametrize("flag,knob", [
    ("--gin.BATCH_SIZE=0", "batch_size"),
    ("--gin.TRAIN_STEPS=0", "num_steps"),
    ("--gin.run.TrainConfig.init_mode='copy'", "init_mode"),
    ("--gin.OBJECTIVE='mlm'", "objective"),
    ("--gin.optimizers.OptimizerConfig.name='sgd'", "name"),
    ("--gin.NUM_SELECTED_EXPERTS=0", "num_selected_experts"),
])
def test_bad_knobs_fail_before_compiling(tmp_path, flag, knob):
  gin_utils.parse([RUN_FILE], [b[len("--gin."):] for b in
                               TINY + [flag, f"--gin.MODEL_DIR='{tmp_path}'"]])
  with pytest.raises(ValueError, match=knob):
    run_lib.configured_run()
  assert not (tmp_path / checkpoints.CHECKPOINTS_DIR).exists()


def test_sigterm_leaves_a_checkpoint_of_the_current_step(tmp_path):
  model_dir = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  process = subprocess.Popen(
      [sys.executable, "-m", "moe_jax.main", "train",
       *_cli(model_dir, "--gin.TRAIN_STEPS=100000",
             "--gin.run.TrainConfig.save_every=100000",
             "--gin.run.TrainConfig.log_every=1")],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  metrics = model_dir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.5)
  assert process.poll() is None, process.stdout.read()
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 128 + signal.SIGTERM, output
  last = json.loads(metrics.read_text().splitlines()[-1])["step"]
  assert checkpoints.resolve_step(model_dir) == last
  params = checkpoints.restore_params(model_dir)
  assert "encoder" in params and "decoder" in params
