"""Train step: loss terms and their gradients, overfitting, freezing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import MoeConfig, TransformerConfig, build_model
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter
from moe_jax.train import objective, optimizers, step as train_step


def tiny_model():
  moe = MoeConfig(layer=MoeLayer(
      router=TokenChoiceRouter(num_selected_experts=2), num_experts=4,
      train_capacity_factor=2.0, min_expert_capacity=1))
  return build_model(TransformerConfig(
      vocab_size=32, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
      num_encoder_layers=2, num_decoder_layers=2, encoder_moe=moe,
      decoder_moe=moe))


def tiny_batch(seed=0):
  rng = np.random.default_rng(seed)
  targets = rng.integers(2, 32, (4, 6)).astype(np.int32)
  targets[1, 4:] = 0
  return {
      "encoder_input_tokens": rng.integers(2, 32, (4, 8)).astype(np.int32),
      "decoder_input_tokens": np.concatenate(
          [np.zeros((4, 1), np.int32), targets[:, :-1]], 1),
      "decoder_target_tokens": targets,
      "decoder_loss_weights": (targets > 0).astype(np.float32),
  }


def plain_cross_entropy(logits, batch):
  log_probs = jax.nn.log_softmax(logits)
  picked = jnp.take_along_axis(log_probs,
                               batch["decoder_target_tokens"][..., None],
                               -1)[..., 0]
  weights = batch["decoder_loss_weights"]
  return -jnp.sum(picked * weights) / jnp.sum(weights)


def _grads(model, params, batch, loss_config):
  rng = jax.random.PRNGKey(3)
  return jax.jit(jax.grad(lambda p: train_step.loss_fn(
      model, loss_config, p, {}, batch, rng)[0]))(params)


def test_zero_routing_weights_give_plain_cross_entropy_gradients():
  model, batch = tiny_model(), tiny_batch()
  params = train_step.init_state(model, optimizers.make_optimizer(
      optimizers.OptimizerConfig()), batch, jax.random.PRNGKey(0)).params
  rng = jax.random.PRNGKey(3)

  def plain(p):
    out = model.apply({"params": p}, **train_step.model_inputs(batch),
                      enable_dropout=True, rngs={"dropout": rng})
    return plain_cross_entropy(out.logits, batch)

  want = jax.jit(jax.grad(plain))(params)
  got = _grads(model, params, batch, objective.LossConfig(0.0, 0.0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               got, want)

  # With weights > 0 the difference is exactly the routing terms' gradient.
  weighted = _grads(model, params, batch, objective.LossConfig(0.1, 0.01))

  def routing_terms(p):
    out = model.apply({"params": p}, **train_step.model_inputs(batch),
                      enable_dropout=True, rngs={"dropout": rng})
    return (0.1 * jnp.mean(out.moe_stats.auxiliary_loss) +
            0.01 * jnp.mean(out.moe_stats.router_z_loss))

  extra = jax.jit(jax.grad(routing_terms))(params)
  jax.tree.map(lambda w, g, e: np.testing.assert_allclose(w - g, e, atol=1e-6),
               weighted, got, extra)
  router = extra["encoder"]["block_0"]["layer_1"]["moe"]["router"]
  assert float(jnp.abs(router["router_weights"]["kernel"]).sum()) > 0


def test_loss_metrics_are_reported_separately():
  model, batch = tiny_model(), tiny_batch()
  params = train_step.init_state(model, optimizers.make_optimizer(
      optimizers.OptimizerConfig()), batch, jax.random.PRNGKey(0)).params
  loss, (metrics, _) = train_step.loss_fn(
      model, objective.LossConfig(0.5, 0.1), params, {}, batch,
      jax.random.PRNGKey(0))
  np.testing.assert_allclose(
      loss, metrics["cross_entropy"] + metrics["weighted_auxiliary_loss"] +
      metrics["weighted_router_z_loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["weighted_auxiliary_loss"],
                             0.5 * metrics["auxiliary_loss"], rtol=1e-6)
  assert metrics["expert_usage/per_layer"].shape == (2,)


def test_label_smoothing_and_logits_z_loss():
  logits = jnp.array([[[4.0, 0.0, 0.0]]])
  targets = jnp.array([[0]])
  weights = jnp.ones((1, 1))
  plain, _ = objective.cross_entropy(logits, targets, weights)
  np.testing.assert_allclose(plain, -jax.nn.log_softmax(logits)[0, 0, 0],
                             rtol=1e-5)
  # Predicting the soft targets exactly scores 0.
  soft = jnp.log(jnp.array([[[0.8, 0.1, 0.1]]]))
  smoothed, _ = objective.cross_entropy(soft, targets, weights, 0.2)
  np.testing.assert_allclose(smoothed, 0.0, atol=1e-6)
  _, z_term = objective.cross_entropy(logits, targets, weights,
                                      logits_z_loss=1e-2)
  np.testing.assert_allclose(z_term,
                             1e-2 * jax.nn.logsumexp(logits[0, 0]) ** 2,
                             rtol=1e-6)


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_tiny_model_overfits_a_tiny_batch(name):
  model, batch = tiny_model(), tiny_batch()
  optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig(
      name=name, learning_rate=3e-2 if name == "adamw" else 0.05,
      schedule="constant", warmup_steps=5))
  state = train_step.init_state(model, optimizer, batch,
                                jax.random.PRNGKey(0))
  step = functools.partial(
      train_step.make_train_step(model, optimizer, objective.LossConfig()),
      dropout_key=jax.random.PRNGKey(1))
  losses = []
  for _ in range(80):
    state, metrics = step(state, batch)
    losses.append(float(metrics["cross_entropy"]))
  assert losses[-1] < losses[0] / 5, losses[::10]


@pytest.mark.parametrize("freeze,frozen,trained", [
    ("router", "router", "experts"), ("experts", "experts", "router")])
def test_freezing_keeps_parameters_fixed(freeze, frozen, trained):
  model, batch = tiny_model(), tiny_batch()
  optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig(
      name="adamw", learning_rate=1e-2, freeze=freeze))
  state = train_step.init_state(model, optimizer, batch,
                                jax.random.PRNGKey(0))
  before = jax.tree.map(np.asarray, state.params)
  step = functools.partial(
      train_step.make_train_step(model, optimizer, objective.LossConfig()),
      dropout_key=jax.random.PRNGKey(1))
  for _ in range(3):
    state, _ = step(state, batch)
  moe_before = before["encoder"]["block_0"]["layer_1"]["moe"]
  moe_after = state.params["encoder"]["block_0"]["layer_1"]["moe"]
  jax.tree.map(np.testing.assert_array_equal, moe_after[frozen],
               moe_before[frozen])
  changed = jax.tree.leaves(jax.tree.map(
      lambda a, b: not np.array_equal(a, b), moe_after[trained],
      moe_before[trained]))
  assert all(changed)


def test_schedules():
  make = lambda kind: optimizers.make_schedule(optimizers.OptimizerConfig(
      learning_rate=1.0, schedule=kind, warmup_steps=10, total_steps=30))
  rsqrt, constant, cosine = map(make, ["rsqrt", "constant", "cosine"])
  np.testing.assert_allclose(rsqrt(4), 0.5)          # warmup: 5 / 10
  np.testing.assert_allclose(rsqrt(39), 0.5)         # sqrt(10 / 40)
  np.testing.assert_allclose(constant(99), 1.0)
  np.testing.assert_allclose(cosine(19), 0.5, atol=1e-6)  # half way
  np.testing.assert_allclose(cosine(29), 0.0, atol=1e-6)


@pytest.mark.parametrize("kwargs,knob", [
    (dict(name="sgd"), "name='sgd'"),
    (dict(schedule="linear"), "schedule='linear'"),
    (dict(freeze="gates"), "freeze='gates'"),
    (dict(learning_rate=0.0), "learning_rate=0.0"),
    (dict(warmup_steps=-1), "warmup_steps=-1"),
])
def test_bad_optimizer_knobs(kwargs, knob):
  with pytest.raises(ValueError, match=knob):
    optimizers.OptimizerConfig(**kwargs)


def test_bad_loss_knobs():
  with pytest.raises(ValueError, match="aux_loss_factor=-1"):
    objective.LossConfig(aux_loss_factor=-1)
  with pytest.raises(ValueError, match="label_smoothing=1.0"):
    objective.LossConfig(label_smoothing=1.0)


def test_seeds_share_one_compiled_step_and_dropout_follows_the_key():
  model = build_model(TransformerConfig(
      vocab_size=32, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
      num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.5))
  batch = tiny_batch()
  optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig(
      name="adamw", learning_rate=1e-2))
  step = train_step.make_train_step(model, optimizer, objective.LossConfig())
  fresh = lambda: train_step.init_state(model, optimizer, batch,
                                        jax.random.PRNGKey(0))
  keys = [jax.random.PRNGKey(1), jax.random.PRNGKey(2)]
  programs = {step.lower(fresh(), batch, k).as_text() for k in keys}
  assert len(programs) == 1
  losses = [float(step(fresh(), batch, k)[1]["loss"]) for k in keys]
  assert losses[0] != losses[1]
  again = float(step(fresh(), batch, keys[0])[1]["loss"])
  assert again == losses[0]
