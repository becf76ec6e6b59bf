"""The main command fine-tuning from a T5X-format checkpoint directory
(written by real T5X's Checkpointer; skipped without T5X): the run's
step-0 parameters are the checkpoint's, and training goes on from them."""

import json

import gin
import jax
import numpy as np

from moe_jax import gin_utils
from moe_jax.interop import flaxformer_names, t5x_checkpoint
from moe_jax.main import main
from moe_jax.models import configured_model_config
from moe_jax.train import checkpoints
from moe_jax.train import run as run_lib
from tests.test_interop_t5x_checkpoint import random_params, write_t5x
from tests.test_main_train import RUN_FILE, _cli
from tests.test_main_train import _clear_gin  # noqa: F401  (autouse)


def test_train_command_starts_from_a_t5x_checkpoint(tmp_path, monkeypatch,
                                                    capsys):
  t5x_dir, model_dir = tmp_path / "t5x", tmp_path / "run"
  flags = _cli(model_dir, "--gin.TRAIN_STEPS=2", "--gin.EVAL_MIXTURE=None",
               f"--gin.run.TrainConfig.init_checkpoint='{t5x_dir}'",
               "--gin.run.TrainConfig.init_format='t5x'")
  # The run's model (the tiny ST-MoE-style T5 of the run file), as a T5X
  # checkpoint under flaxformer's names.
  gin_utils.parse([RUN_FILE], [f[len("--gin."):] for f in flags
                               if f.startswith("--gin.")])
  config = configured_model_config()
  gin.clear_config()
  source = random_params(config, seed=6)
  write_t5x(flaxformer_names.export_params(source, config), t5x_dir)

  step_zero = []   # host copies (the train step donates the state)
  initial_state = run_lib._Trainer.initial_state

  def recorded(self, *args):
    state = initial_state(self, *args)
    step_zero.append(jax.tree.map(np.asarray, (state.step, state.params)))
    return state

  monkeypatch.setattr(run_lib._Trainer, "initial_state", recorded)
  main(["train", *flags])

  ((step, params),) = step_zero
  assert step == 0
  # The checkpoint's parameters as the reader gives them (bitwise; they
  # differ from `source` by the rounding of the query's sqrt(8) scaling).
  jax.tree.map(np.testing.assert_array_equal, params,
               t5x_checkpoint.import_t5x(t5x_dir, config))
  count = len(jax.tree.leaves(source))
  assert f"initialized {count} parameter arrays from {t5x_dir}" in (
      capsys.readouterr().out)
  losses = [json.loads(line) for line in
            (model_dir / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in losses] == [1, 2]
  assert all(np.isfinite(m["loss"]) for m in losses)
  assert checkpoints.resolve_step(model_dir) == 2
  trained = checkpoints.restore_params(model_dir)
  changed = jax.tree.leaves(jax.tree.map(
      lambda a, b: not np.array_equal(np.asarray(a), b), trained, source))
  assert sum(changed) > count // 2   # the updates moved most arrays
