"""Routing health while training: load statistics against hand-made loads,
when warnings fire, router entropy against captured router probabilities,
and a real training run whose router sends every token to expert 0."""

import json
import types

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from moe_jax import gin_utils
from moe_jax.models import MoeConfig, TransformerConfig, build_model
from moe_jax.moe import metric_names
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter
from moe_jax.moe.routers.hash_layers import HashRouter
from moe_jax.train import (checkpoints, loop, metrics_log, objective,
                           optimizers, routing_monitor as rm, run, summary)

VOCAB, EXPERTS, BATCH, LENGTH = 32, 4, 2, 8


def test_load_stats_of_hand_made_loads():
  stats = rm.load_stats(np.array([[4, 4, 4, 4], [8, 0, 0, 0], [0, 0, 0, 0],
                                  [1, 2, 3, 6]]))
  # [1, 2, 3, 6]: mean 3, population std sqrt(14 / 4).
  np.testing.assert_allclose(stats.cv, [0, np.sqrt(3), 0, np.sqrt(3.5) / 3])
  np.testing.assert_allclose(stats.max_over_mean, [1, 4, 0, 2])
  np.testing.assert_allclose(stats.min_over_mean, [1, 0, 0, 1 / 3])
  np.testing.assert_array_equal(stats.idle[1], [False, True, True, True])


def _step(cv_load, dropped):
  """Metrics of a step of one sparse layer."""
  return {rm.layer_key(rm.EXPERT_LOAD, 0): cv_load,
          rm.layer_key(rm.DROP_FRACTION, 0): dropped}


def test_warnings_fire_on_crossing_and_when_an_expert_dies():
  monitor = rm.RoutingMonitor(rm.MonitorConfig(
      max_load_cv=1.0, max_drop_fraction=0.5, dead_expert_steps=2))
  steps = [([8, 0, 0, 0], 0.1),   # CV sqrt(3): crosses
           ([8, 0, 0, 1], 0.6),   # still above; drop crosses; 1, 2 dead
           ([2, 2, 2, 2], 0.6),   # balanced again; 3 was fed at step 2
           ([8, 0, 0, 0], 0.0)]   # CV crosses again
  kinds = []
  for step, (load, dropped) in enumerate(steps, 1):
    report = monitor(step, _step(load, dropped))
    kinds.append([(w.kind, w.expert) for w in report.warnings])
  assert kinds == [[(rm.LOAD_CV, None)],
                   [(rm.DROP_FRACTION, None), (rm.DEAD_EXPERTS, 1),
                    (rm.DEAD_EXPERTS, 2)],
                   [],
                   [(rm.LOAD_CV, None)]]
  assert report.metrics[rm.layer_key(rm.DEAD_EXPERTS, 0)] == 0
  assert "load CV 1.732 > max_load_cv=1" in report.warnings[0].message


def test_dense_model_and_disabled_warnings():
  assert rm.RoutingMonitor(rm.MonitorConfig())(1, {"loss": 1.0}) == (
      rm.MonitorReport({}, ()))
  quiet = rm.RoutingMonitor(rm.MonitorConfig(max_load_cv=None,
                                             max_drop_fraction=None))
  assert quiet(1, _step([8, 0, 0, 0], 0.9)).warnings == ()


@pytest.mark.parametrize("knob, value, match", [
    ("max_load_cv", -1.0, "max_load_cv=-1.0"),
    ("max_drop_fraction", -0.1, "max_drop_fraction=-0.1"),
    ("dead_expert_steps", 0, "dead_expert_steps=0")])
def test_bad_thresholds_name_the_knob(knob, value, match):
  with pytest.raises(ValueError, match=match):
    rm.MonitorConfig(**{knob: value})


def test_router_entropy_equals_captured_router_probs():
  layer = MoeLayer(router=TokenChoiceRouter(num_selected_experts=2),
                   num_experts=EXPERTS, expert_hidden_dim=8)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 4))
  mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2], jnp.float32)
  params = layer.init(jax.random.PRNGKey(1), x, mask, deterministic=True)
  (_, stats), captured = layer.apply(params, x, mask, deterministic=True,
                                     mutable=[metric_names.ROUTING])
  routing = captured[metric_names.ROUTING]
  probs = np.asarray(routing[metric_names.ROUTER_PROBS][0], np.float64)
  real = np.asarray(routing[metric_names.TOKEN_MASK][0]) > 0
  entropy = -np.sum(probs * np.log(probs), axis=-1)[real].mean()
  np.testing.assert_allclose(stats.router_entropy, entropy, rtol=1e-5)
  assert 0 < entropy < np.log(EXPERTS)


def _collapsed_model():
  """Every token to expert 0: a hash router whose table is all zeros."""
  moe = MoeConfig(layer=MoeLayer(router=HashRouter(table=(0,) * VOCAB),
                                 num_experts=EXPERTS, min_expert_capacity=1),
                  sparse_every=1)
  config = TransformerConfig(
      vocab_size=VOCAB, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
      num_encoder_layers=1, num_decoder_layers=1, encoder_moe=moe,
      decoder_moe=moe)
  return build_model(config), moe.layer


def _batch(step):
  """No padding: all B * L tokens of a stack are real and routed."""
  rng = np.random.default_rng(step)
  targets = rng.integers(2, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  return {"encoder_input_tokens":
              rng.integers(2, VOCAB, (BATCH, LENGTH)).astype(np.int32),
          "decoder_input_tokens": np.concatenate(
              [np.ones((BATCH, 1), np.int32), targets[:, :-1]], 1),
          "decoder_target_tokens": targets}


def _events(model_dir):
  """{tag: [tensor per step]} of the TensorBoard train events."""
  out = {}
  for path in (model_dir / metrics_log.TENSORBOARD_DIR / "train").iterdir():
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        out.setdefault(value.tag, []).append(tf.make_ndarray(value.tensor))
  return out


def test_collapsed_router_run_warns_and_logs_the_load(tmp_path, capsys):
  model, layer = _collapsed_model()
  config = rm.MonitorConfig(max_load_cv=1.0, max_drop_fraction=0.3,
                            dead_expert_steps=3)
  logger = metrics_log.MetricsLogger(str(tmp_path), 4, BATCH * LENGTH * 2,
                                     None, log_every=2, monitor=config)
  ckpt = checkpoints.Checkpointer(str(tmp_path), "collapse", save_every=10,
                                  keep=1, async_save=False)
  optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig(
      learning_rate=1e-2, warmup_steps=1))
  result = loop.train(model, optimizer, objective.LossConfig(), _batch, 4,
                      ckpt, on_step=logger)
  ckpt.close()
  logger.close()
  records = [json.loads(l) for l in
             (tmp_path / metrics_log.METRICS_FILE).read_text().splitlines()]
  tokens = BATCH * LENGTH  # one group per stack
  capacity = layer.capacity(tokens, deterministic=False)
  assert capacity < tokens
  expected_load = [capacity] + [0] * (EXPERTS - 1)
  layers = len(rm.layer_values(records[0], rm.EXPERT_LOAD))
  assert layers == 2  # the encoder's layer, then the decoder's
  for record in records:
    load = rm.layer_values(record, rm.EXPERT_LOAD)
    np.testing.assert_array_equal(load, [expected_load] * layers)
    direct = rm.load_stats(load)
    for name, values in ((rm.LOAD_CV, direct.cv),
                         (rm.LOAD_MAX_OVER_MEAN, direct.max_over_mean),
                         (rm.LOAD_MIN_OVER_MEAN, direct.min_over_mean)):
      np.testing.assert_allclose(rm.layer_values(record, name), values)
    np.testing.assert_allclose(rm.layer_values(record, rm.LOAD_CV),
                               np.sqrt(EXPERTS - 1))
    np.testing.assert_allclose(rm.layer_values(record, rm.DROP_FRACTION),
                               1 - capacity / tokens, rtol=1e-6)
    np.testing.assert_array_equal(rm.layer_values(record, rm.ROUTER_ENTROPY),
                                  0)
    np.testing.assert_array_equal(
        rm.layer_values(record, rm.DEAD_EXPERTS),
        EXPERTS - 1 if record["step"] >= 3 else 0)
  warned = {r["step"]: sorted((w["kind"], w["layer"], w["expert"])
                              for w in r.get(rm.WARNINGS, []))
            for r in records}
  every_layer = range(layers)
  assert warned == {
      1: sorted([(rm.LOAD_CV, i, None) for i in every_layer] +
                [(rm.DROP_FRACTION, i, None) for i in every_layer]),
      2: [],
      3: sorted((rm.DEAD_EXPERTS, i, e) for i in every_layer
                for e in range(1, EXPERTS)),
      4: []}
  console = capsys.readouterr().out
  for warning in records[0][rm.WARNINGS] + records[2][rm.WARNINGS]:
    assert f"WARNING routing: {warning['message']}" in console
  assert "sparse layer 1: expert 2 received no token for 3 steps" in console
  assert (f"routing: load cv max {np.sqrt(EXPERTS - 1):.3g} (layer 0)"
          in console)
  assert f"dead experts {layers * (EXPERTS - 1)}/{layers * EXPERTS}" in (
      console)
  histograms = _events(tmp_path)[rm.layer_key(rm.EXPERT_LOAD, 1)]
  assert len(histograms) == 4
  np.testing.assert_array_equal(histograms[-1][:, 2], expected_load)
  np.testing.assert_array_equal(histograms[-1][:, 0],
                                np.arange(EXPERTS) - 0.5)
  printed = summary.format_summary(
      types.SimpleNamespace(train=types.SimpleNamespace(model_dir="dir")),
      run.TrainResult(result, {}))
  assert (f"load_cv (worst layer)        {np.sqrt(EXPERTS - 1):.4f} (layer 0"
          in printed)
  assert "router_entropy               0.0000" in printed


def test_gin_binds_the_thresholds(tmp_path):
  macros = tmp_path / "macros.gin"
  macros.write_text(f"""
MODEL_DIR = '{tmp_path}'
TRAIN_STEPS = 1
MIXTURE = 'mini_flan'
TASK_FEATURE_LENGTHS = {{'inputs': 8, 'targets': 8}}
BATCH_SIZE = 2
""")
  gin.clear_config()
  try:
    gin_utils.parse(
        ["gin/models/t5_1_1_tiny_moe.gin", "gin/runs/train.gin",
         str(macros)],
        ["routing_monitor.MonitorConfig.max_load_cv = 0.5",
         "routing_monitor.MonitorConfig.dead_expert_steps = 7"])
    monitor = run.configured_run().train.monitor
  finally:
    gin.clear_config()
  assert monitor == rm.MonitorConfig(max_load_cv=0.5, dead_expert_steps=7)
