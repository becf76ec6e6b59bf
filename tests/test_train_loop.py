"""Training loop: exact resume, preemption, non-finite loss, config guard."""

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

from moe_jax.models import MoeConfig, TransformerConfig, build_model
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter
from moe_jax.train import checkpoints, loop, objective, optimizers

REPO = Path(__file__).resolve().parent.parent


def tiny_model():
  moe = MoeConfig(layer=MoeLayer(
      router=TokenChoiceRouter(num_selected_experts=2, jitter_noise=0.1),
      num_experts=4, min_expert_capacity=1))
  return build_model(TransformerConfig(
      vocab_size=32, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
      num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.1,
      encoder_moe=moe, decoder_moe=moe))


def batch_fn(step):
  rng = np.random.default_rng(step)
  targets = rng.integers(2, 32, (2, 5)).astype(np.int32)
  return {"encoder_input_tokens": rng.integers(2, 32, (2, 6)).astype(np.int32),
          "decoder_input_tokens": np.concatenate(
              [np.zeros((2, 1), np.int32), targets[:, :-1]], 1),
          "decoder_target_tokens": targets}


def run(model_dir, num_steps, config_text="tiny", **kwargs):
  optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig(
      name="adamw", learning_rate=1e-2, warmup_steps=2))
  ckpt = checkpoints.Checkpointer(str(model_dir), config_text, save_every=2,
                                  keep=2, **kwargs)
  try:
    return loop.train(tiny_model(), optimizer, objective.LossConfig(),
                      batch_fn, num_steps, ckpt, seed=7)
  finally:
    ckpt.close()


def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path):
  whole = run(tmp_path / "whole", 6)
  first = run(tmp_path / "split", 3)
  second = run(tmp_path / "split", 6)
  assert first.resumed_from is None and second.resumed_from == 3
  assert [h["step"] for h in second.history] == [4, 5, 6]
  jax.tree.map(np.testing.assert_array_equal, second.state.params,
               whole.state.params)
  jax.tree.map(np.testing.assert_array_equal, second.state.opt_state,
               whole.state.opt_state)
  np.testing.assert_array_equal(
      [h["loss"] for h in first.history + second.history],
      [h["loss"] for h in whole.history])


def test_keeps_the_last_checkpoints_and_reads_their_params(tmp_path):
  result = run(tmp_path, 7)
  ckpt = checkpoints.Checkpointer(str(tmp_path), "tiny", save_every=2, keep=2)
  assert ckpt.all_steps() == [6, 7]
  ckpt.close()
  assert checkpoints.steps(tmp_path) == [6, 7]
  assert checkpoints.resolve_step(tmp_path) == 7
  jax.tree.map(np.testing.assert_array_equal,
               checkpoints.restore_params(tmp_path), result.state.params)
  step_dir = tmp_path / checkpoints.CHECKPOINTS_DIR / "6"
  jax.tree.map(np.testing.assert_array_equal,
               checkpoints.restore_params(step_dir),
               checkpoints.restore_params(tmp_path, step=6))
  with pytest.raises(ValueError, match=r"step=4 .*saved steps: \[6, 7\]"):
    checkpoints.restore_params(tmp_path, step=4)
  assert checkpoints.steps(tmp_path / "nothing") == []
  with pytest.raises(ValueError, match="train first"):
    checkpoints.resolve_step(tmp_path / "nothing")


def test_a_different_config_is_refused(tmp_path):
  run(tmp_path, 1)
  with pytest.raises(ValueError, match="different config"):
    run(tmp_path, 2, config_text="another")
  assert run(tmp_path, 2, config_text="another",
             overwrite_config=True).resumed_from == 1


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  run(tmp_path, 2)
  # Poison the saved parameters: the next step's loss is NaN.
  ckpt = checkpoints.Checkpointer(str(tmp_path), "tiny", save_every=2, keep=2)
  result = run(tmp_path / "probe", 1)
  state = ckpt.restore(2, result.state)
  poisoned = state.replace(step=state.step + 1, params=jax.tree.map(
      lambda p: p * np.nan, state.params))
  ckpt.save(3, poisoned, force=True)
  ckpt.wait()
  ckpt.close()
  with pytest.raises(loop.NonFiniteLossError,
                     match="at step 4.*Deleted checkpoint 3.*step 2"):
    run(tmp_path, 6)
  ckpt = checkpoints.Checkpointer(str(tmp_path), "tiny", save_every=2, keep=2)
  assert ckpt.latest_step() == 2
  ckpt.close()


_PREEMPTED_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_train_loop import run
    import test_train_loop as t
    slow = t.batch_fn
    def batch_fn(step):
      time.sleep(0.3)
      return slow(step)
    t.batch_fn = batch_fn
    result = run({model_dir!r}, 1000)
    print("stopped", result.preempted, int(result.state.step), flush=True)
""")


def test_sigterm_saves_the_current_step(tmp_path):
  script = _PREEMPTED_RUN.format(tests=str(REPO / "tests"),
                                 model_dir=str(tmp_path))
  process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**os.environ})
  ckpt_dir = tmp_path / checkpoints.CHECKPOINTS_DIR
  deadline = time.time() + 240
  while time.time() < deadline and not (
      ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=240)
  assert process.returncode == 0, out
  line = [l for l in out.splitlines() if l.startswith("stopped")][-1]
  _, preempted, step = line.split()
  assert preempted == "True" and 2 <= int(step) < 1000
  ckpt = checkpoints.Checkpointer(str(tmp_path), "tiny", save_every=2, keep=2)
  assert ckpt.latest_step() == int(step)
  restored = ckpt.restore(int(step), run(tmp_path / "probe", 1).state)
  assert int(restored.step) == int(step)
  ckpt.close()
