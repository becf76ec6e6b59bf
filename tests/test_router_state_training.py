"""The trainer carries non-gradient model state: the aux-loss-free
router's selection bias is updated by the train step, checkpointed,
resumed exactly, and read back for evaluation."""

import jax
import numpy as np
import pytest

from moe_jax.models import MoeConfig, TransformerConfig, build_model
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.metric_names import ROUTER_STATE
from moe_jax.moe.routers import AuxLossFreeRouter
from moe_jax.train import checkpoints, loop, objective, optimizers
from moe_jax.train.step import TrainState, model_inputs, model_variables
from tests.test_train_loop import batch_fn

NUM_EXPERTS = 4


def aux_free_model(rate):
  moe = MoeConfig(layer=MoeLayer(
      router=AuxLossFreeRouter(num_selected_experts=1,
                               bias_update_rate=rate),
      num_experts=NUM_EXPERTS, min_expert_capacity=1))
  return build_model(TransformerConfig(
      vocab_size=32, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
      num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
      encoder_moe=moe, decoder_moe=moe))


def run(model_dir, num_steps, rate=0.05):
  optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig(
      name="adamw", learning_rate=1e-2, warmup_steps=2))
  ckpt = checkpoints.Checkpointer(str(model_dir), f"aux_free {rate}",
                                  save_every=2, keep=2, async_save=False)
  try:
    return loop.train(aux_free_model(rate), optimizer,
                      objective.LossConfig(aux_loss_factor=0.0), batch_fn,
                      num_steps, ckpt, seed=3)
  finally:
    ckpt.close()


def biases(state):
  """<[layers, E]> selection biases of every sparse layer of `state`."""
  leaves = jax.tree.leaves(state.model_state[ROUTER_STATE])
  return np.concatenate([np.asarray(b).reshape(-1, NUM_EXPERTS)
                         for b in leaves])


def mean_load_cv(history, last):
  loads = np.array([v for h in history[-last:] for k, v in h.items()
                    if k.startswith("expert_load/layer_")])
  return float(np.mean(loads.std(-1) / loads.mean(-1)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One step; 6 steps; 3 then 6 resumed; 6 without bias updates."""
  root = tmp_path_factory.mktemp("router_state")
  out = {"one": run(root / "one", 1), "whole": run(root / "whole", 6),
         "first": run(root / "split", 3)}
  out["second"] = run(root / "split", 6)
  out["frozen"] = run(root / "frozen", 6, rate=0.0)
  out["root"] = root
  return out


def test_train_step_updates_the_bias_once_per_call(runs):
  first = runs["one"]
  bias = biases(first.state)
  # After one call every bias is +-rate (or 0): the sign update ran once.
  assert np.all(np.isclose(np.abs(bias), 0.05) | (bias == 0))
  assert np.abs(bias).sum() > 0


def test_bias_updates_lower_the_load_cv(runs):
  balanced, frozen = runs["whole"], runs["frozen"]
  assert not biases(frozen.state).any()
  assert biases(balanced.state).any()
  assert mean_load_cv(balanced.history, 3) < mean_load_cv(frozen.history, 3)


def test_resumed_run_is_bitwise_identical_and_bias_is_checkpointed(runs):
  whole, second = runs["whole"], runs["second"]
  assert second.resumed_from == 3
  for field in ("params", "opt_state", "model_state"):
    jax.tree.map(np.testing.assert_array_equal,
                 getattr(second.state, field), getattr(whole.state, field))
  saved = checkpoints.restore_model_state(runs["root"] / "whole")
  jax.tree.map(np.testing.assert_array_equal, saved,
               whole.state.model_state)
  # Evaluation applies the model with the saved bias (and needs it).
  model = aux_free_model(0.05)
  inputs = model_inputs(batch_fn(0))
  logits = model.apply(model_variables(whole.state.params, saved), **inputs,
                       enable_dropout=False).logits
  assert np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match=ROUTER_STATE):
    model.apply(model_variables(whole.state.params), **inputs,
                enable_dropout=False)


def test_checkpoint_without_model_state_is_refused_by_name(runs, tmp_path):
  state = runs["one"].state
  ckpt = checkpoints.Checkpointer(str(tmp_path / "old"), "old", save_every=1,
                                  async_save=False)
  # A train state as saved before it held model state: no such field.
  ckpt.save(1, {"step": state.step, "params": state.params,
                "opt_state": state.opt_state}, force=True)
  with pytest.raises(ValueError, match="holds no model_state.*router_state"):
    ckpt.restore(1, state)
  empty = TrainState(state.step, state.params, state.opt_state)
  restored = ckpt.restore(1, empty)
  assert restored.model_state == {}
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
  assert checkpoints.restore_model_state(tmp_path / "old" / "checkpoints"
                                         / "1") == {}
  ckpt.close()
