"""The trainer carries non-gradient model state: the aux-loss-free
router's selection bias is updated by the train step from its own layer's
load, lowers the load CV, is checkpointed, resumed exactly, and read back
for evaluation."""

import jax
import numpy as np
import pytest

from moe_jax.models import MoeConfig, TransformerConfig, build_model
from moe_jax.models.outputs import per_sparse_layer
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.metric_names import ROUTER_STATE
from moe_jax.moe.routers import AuxLossFreeRouter
from moe_jax.train import checkpoints, loop, objective, optimizers
from moe_jax.train.routing_monitor import layer_values
from moe_jax.train.step import TrainState, model_inputs, model_variables

NUM_EXPERTS = 4
# A step small against the spread of the router probabilities (a larger one
# makes the choices swing between experts from step to step).
RATE = 0.01
STEPS = 10


def batch_fn(step):
  """8 x 16 random tokens per stack: enough to measure the load."""
  rng = np.random.default_rng(step)
  targets = rng.integers(2, 32, (8, 16)).astype(np.int32)
  return {"encoder_input_tokens": rng.integers(2, 32, (8, 16)).astype(
              np.int32),
          "decoder_input_tokens": np.concatenate(
              [np.zeros((8, 1), np.int32), targets[:, :-1]], 1),
          "decoder_target_tokens": targets}


def aux_free_model(rate, scan_layers=False):
  """Two sparse layers per stack; capacity for every token (no drops), so
  the logged (dispatched) load is the load the bias update reads."""
  moe = MoeConfig(layer=MoeLayer(
      router=AuxLossFreeRouter(num_selected_experts=1,
                               bias_update_rate=rate),
      num_experts=NUM_EXPERTS, min_expert_capacity=1,
      train_capacity_factor=float(NUM_EXPERTS)), sparse_every=1)
  return build_model(TransformerConfig(
      vocab_size=32, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
      num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
      encoder_moe=moe, decoder_moe=moe, scan_layers=scan_layers))


def run(model_dir, num_steps, rate=RATE, scan_layers=False):
  optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig(
      name="adamw", learning_rate=1e-2, warmup_steps=2))
  ckpt = checkpoints.Checkpointer(
      str(model_dir), f"aux_free {rate} {scan_layers}", save_every=2, keep=2,
      async_save=False)
  try:
    return loop.train(aux_free_model(rate, scan_layers), optimizer,
                      objective.LossConfig(aux_loss_factor=0.0), batch_fn,
                      num_steps, ckpt, seed=3)
  finally:
    ckpt.close()


def biases(state):
  """<[R, E]> selection biases of the sparse layers of `state`."""
  return np.asarray(per_sparse_layer(state.model_state[ROUTER_STATE]))


def per_step(history, name):
  """<[T, R, E]> per-layer values `name/layer_<i>` of every step."""
  return np.stack([layer_values(h, name) for h in history])


def mean_load_cv(history, last):
  loads = per_step(history, "expert_load")[-last:]
  return float(np.mean(loads.std(-1) / loads.mean(-1)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """STEPS steps (unrolled and scanned); 3 then STEPS resumed; STEPS
  without bias updates."""
  root = tmp_path_factory.mktemp("router_state")
  out = {"whole": run(root / "whole", STEPS),
         "scanned": run(root / "scanned", STEPS, scan_layers=True),
         "first": run(root / "split", 3)}
  out["second"] = run(root / "split", STEPS)
  out["frozen"] = run(root / "frozen", STEPS, rate=0.0)
  out["root"] = root
  return out


@pytest.mark.parametrize("name", ["whole", "scanned"])
def test_each_layer_bias_moves_against_that_layers_load(runs, name):
  result = runs[name]
  load = per_step(result.history, "expert_load")         # [T, R, E]
  bias = per_step(result.history, "selection_bias")      # after each step
  assert bias.shape[1:] == (4, NUM_EXPERTS)
  np.testing.assert_array_equal(bias[-1], biases(result.state))
  # One sign update of +-RATE (or 0) per call and layer.
  moved = np.diff(bias, axis=0, prepend=0.0) / RATE
  # Overloaded experts' bias goes down, underloaded ones' up, by that
  # layer's load of that step (all tokens dispatched: load = choices).
  want = np.sign(load.mean(-1, keepdims=True) - load)
  np.testing.assert_allclose(moved, want, atol=1e-4)
  # The layers' loads differ, so pairing a bias with another layer's load
  # (e.g. the decoder's bias with the encoder's load) would fail above.
  for other in range(1, load.shape[1]):
    assert (want[:, 0] != want[:, other]).any()


def test_bias_updates_lower_the_load_cv(runs):
  balanced, frozen = runs["whole"], runs["frozen"]
  assert not biases(frozen.state).any()
  assert biases(balanced.state).any()
  # Without the bias the router drifts to a few experts (aux loss off).
  assert mean_load_cv(balanced.history, 5) < 0.8 * mean_load_cv(
      frozen.history, 5)


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
  model = aux_free_model(RATE)
  inputs = model_inputs(batch_fn(0))
  logits = model.apply(model_variables(whole.state.params, saved), **inputs,
                       enable_dropout=False).logits
  assert np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match=ROUTER_STATE):
    model.apply(model_variables(whole.state.params), **inputs,
                enable_dropout=False)


def test_checkpoint_without_model_state_is_refused_by_name(runs, tmp_path):
  state = runs["first"].state
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
