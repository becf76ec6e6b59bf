"""T5X adapter: module contracts, MoE loss terms, axis rules (no t5x needed);
one T5X train step when t5x is importable."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from moe_jax.moe import metric_names
from moe_jax.models import build_model
from moe_jax.t5x import losses as t5x_losses
from moe_jax.t5x.modules import T5XDecoderOnly, T5XEncoderDecoder
from moe_jax.t5x.partitioning import T5X_MESH_AXES, t5x_logical_axis_rules
from tests.test_models import forward, init, random_batch, tiny

P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY

# (name, kind, default) as T5X's models call the module.
ENC_DEC_CALL = [
    ("encoder_input_tokens", P, inspect.Parameter.empty),
    ("decoder_input_tokens", P, inspect.Parameter.empty),
    ("decoder_target_tokens", P, inspect.Parameter.empty),
    ("encoder_segment_ids", P, None), ("decoder_segment_ids", P, None),
    ("encoder_positions", P, None), ("decoder_positions", P, None),
    ("enable_dropout", K, True), ("decode", K, False)]
ENCODE = [("encoder_input_tokens", P, inspect.Parameter.empty),
          ("encoder_segment_ids", P, None), ("encoder_positions", P, None),
          ("enable_dropout", K, True)]
DECODE = [("encoded", P, inspect.Parameter.empty),
          ("encoder_input_tokens", P, inspect.Parameter.empty),
          ("decoder_input_tokens", P, inspect.Parameter.empty),
          ("decoder_target_tokens", P, None),
          ("encoder_segment_ids", P, None), ("decoder_segment_ids", P, None),
          ("decoder_positions", P, None), ("enable_dropout", K, True),
          ("decode", K, False), ("max_decode_length", K, None)]
DEC_ONLY_CALL = [
    ("decoder_input_tokens", P, inspect.Parameter.empty),
    ("decoder_target_tokens", P, None), ("decoder_segment_ids", P, None),
    ("decoder_positions", P, None), ("decoder_causal_attention", P, None),
    ("enable_dropout", K, True), ("decode", K, False), ("prefill", K, False),
    ("prefill_lengths", K, None), ("max_decode_length", K, None)]


def signature(fn):
  return [(p.name, p.kind, p.default)
          for p in inspect.signature(fn).parameters.values()
          if p.name != "self"]


@pytest.mark.parametrize("fn, contract", [
    (T5XEncoderDecoder.__call__, ENC_DEC_CALL),
    (T5XEncoderDecoder.encode, ENCODE),
    (T5XEncoderDecoder.decode, DECODE),
    (T5XDecoderOnly.__call__, DEC_ONLY_CALL)])
def test_signatures_follow_t5x_contract(fn, contract):
  assert signature(fn) == contract


def test_encoder_decoder_returns_moe_jax_logits():
  config = tiny()
  batch = random_batch(config)
  model = T5XEncoderDecoder(config)
  params = init(model, batch)
  logits = forward(model, params, batch)
  assert logits.shape == (2, 5, config.vocab_size)
  # Same parameter tree and same function as the moe_jax model.
  expected = forward(build_model(config), params, batch).logits
  np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)

  encoded = model.apply(params, batch["encoder_input_tokens"],
                        enable_dropout=False, method=model.encode)
  assert encoded.shape == (2, 7, config.emb_dim)
  decoded = model.apply(params, encoded, batch["encoder_input_tokens"],
                        batch["decoder_input_tokens"],
                        batch["decoder_target_tokens"], enable_dropout=False,
                        method=model.decode)
  np.testing.assert_allclose(decoded, logits, rtol=1e-5, atol=1e-5)


def test_encoder_decoder_cached_decode_matches_full_pass():
  config = tiny()
  batch = random_batch(config)
  model = T5XEncoderDecoder(config)
  variables = init(model, batch, decode=True)
  full = forward(model, {"params": variables["params"]}, batch)
  encoded = model.apply(variables, batch["encoder_input_tokens"],
                        enable_dropout=False, method=model.encode)
  cache = variables["cache"]
  tokens = batch["decoder_input_tokens"]
  for t in range(tokens.shape[1]):
    step, mutated = model.apply(
        {"params": variables["params"], "cache": cache}, encoded,
        batch["encoder_input_tokens"], tokens[:, t:t + 1],
        enable_dropout=False, decode=True, max_decode_length=tokens.shape[1],
        method=model.decode, mutable=["cache"])
    cache = mutated["cache"]
    np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-4, atol=1e-4)


def test_decoder_only_returns_logits():
  config = tiny(architecture="decoder_only", num_encoder_layers=0,
                encoder_moe=None)
  batch = random_batch(config)
  model = T5XDecoderOnly(config)
  params = init(model, batch)
  logits = forward(model, params, batch)
  assert logits.shape == (2, 12, config.vocab_size)
  expected = forward(build_model(config), params, batch).logits
  np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


def test_moe_loss_terms_match_returned_stats():
  config = tiny()
  batch = random_batch(config)
  base = build_model(config)
  params = init(base, batch)
  output, state = base.apply(params, **batch, enable_dropout=False,
                             mutable=[metric_names.INTERMEDIATES])
  extra, metrics = t5x_losses.moe_loss_and_metrics(
      state[metric_names.INTERMEDIATES], aux_loss_factor=0.5,
      router_z_loss_factor=0.25)
  stats = output.moe_stats
  assert sorted(metrics) == sorted(
      "experts/" + n for n in metric_names.SCALAR_METRICS)
  for name in metric_names.SCALAR_METRICS:
    np.testing.assert_allclose(metrics["experts/" + name],
                               jnp.mean(getattr(stats, name)), rtol=1e-6)
  np.testing.assert_allclose(
      extra, 0.5 * jnp.mean(stats.auxiliary_loss)
      + 0.25 * jnp.mean(stats.router_z_loss), rtol=1e-6)


def test_router_confidence_is_flaxformers():
  """experts/router_confidence, under flaxformer's name, is flaxformer's
  quantity: per sparse layer the summed combine weights over the dispatched
  (token, expert) pairs, divided by their number; then the mean over
  layers (as T5X's MoE models average the sown values)."""
  config = tiny()
  batch = random_batch(config)
  model = build_model(config)
  _, state = model.apply(
      init(model, batch), **batch, enable_dropout=False,
      mutable=[metric_names.INTERMEDIATES, metric_names.ROUTING])
  _, metrics = t5x_losses.moe_loss_and_metrics(
      state[metric_names.INTERMEDIATES], 0.0, 0.0)
  routing = traverse_util.flatten_dict(dict(state[metric_names.ROUTING]))
  per_layer, per_token = [], []
  for path, (weights,) in routing.items():
    if path[-1] == metric_names.COMBINE_WEIGHTS:
      (dispatched,) = routing[path[:-1] + (metric_names.DISPATCH_MASK,)]
      (real,) = routing[path[:-1] + (metric_names.TOKEN_MASK,)]
      per_layer.append(np.sum(weights) / np.sum(dispatched))
      per_token.append(np.sum(weights) / np.sum(real))
  assert len(per_layer) == 2  # one sparse layer per stack
  np.testing.assert_allclose(
      metrics["experts/" + metric_names.ROUTER_CONFIDENCE],
      np.mean(per_layer), rtol=1e-6)
  # Top-2: a token's two weights sum to about twice a pair's mean weight.
  assert np.mean(per_token) > 1.5 * np.mean(per_layer)


def test_moe_loss_terms_are_zero_for_dense_model():
  extra, metrics = t5x_losses.moe_loss_and_metrics({}, 1.0, 1.0)
  assert float(extra) == 0.0 and metrics == {}


def test_t5x_axis_rules_use_only_t5x_mesh_axes():
  rules = dict(t5x_logical_axis_rules())
  for name, axis in rules.items():
    axes = axis if isinstance(axis, tuple) else (axis,)
    assert all(a is None or a in T5X_MESH_AXES for a in axes), name
    assert len(set(axes)) == len(axes), name
  assert rules["expert"] == "data" and rules["batch"] == "data"
  assert rules["expert_mlp"] == "model"


def test_moe_model_class_rejects_unknown_kind():
  from moe_jax.t5x.models import moe_model_class
  with pytest.raises(ValueError, match="kind"):
    moe_model_class("encoder_only")


def test_t5x_moe_model_adds_moe_loss_and_metrics():
  pytest.importorskip("t5x.models")
  import seqio
  from t5x import adafactor
  from t5x import models as t5x_base_models
  from moe_jax.t5x.models import moe_model_class

  config = tiny()
  batch = random_batch(config)
  vocab = seqio.PassThroughVocabulary(size=config.vocab_size)
  kwargs = dict(module=T5XEncoderDecoder(config), input_vocabulary=vocab,
                output_vocabulary=vocab,
                optimizer_def=adafactor.Adafactor(decay_rate=0.8))
  model = moe_model_class("encoder_decoder")(
      aux_loss_factor=0.5, router_z_loss_factor=0.25, **kwargs)
  dense_loss_model = t5x_base_models.EncoderDecoderModel(**kwargs)
  params = init(model.module, batch)["params"]
  loss, metrics = model.loss_fn(params, batch, None)
  base_loss, _ = dense_loss_model.loss_fn(params, batch, None)
  _, state = build_model(config).apply(
      {"params": params}, **batch, enable_dropout=False,
      mutable=[metric_names.INTERMEDIATES])
  extra, expected = t5x_losses.moe_loss_and_metrics(
      state[metric_names.INTERMEDIATES], 0.5, 0.25)
  np.testing.assert_allclose(loss, base_loss + extra, rtol=1e-5)
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name].compute(), value, rtol=1e-5)


def test_t5x_gin_files_parse(tmp_path):
  pytest.importorskip("t5x.train")
  import gin
  from pathlib import Path
  from moe_jax.t5x.models import moe_model_class
  root = Path(__file__).resolve().parents[1]
  prelude = tmp_path / "prelude.gin"
  prelude.write_text("from __gin__ import dynamic_registration\n"
                     "import seqio\n"
                     "VOCABULARY = @seqio.ByteVocabulary()\n")
  gin.clear_config()
  try:
    gin.add_config_file_search_path(str(root))
    gin.parse_config_files_and_bindings(
        [str(root / "gin/models/t5_1_1_tiny_moe.gin"), str(prelude),
         str(root / "gin/t5x/moe_model.gin"),
         str(root / "gin/t5x/partitioning.gin")], [])
    model = gin.query_parameter("%MODEL").scoped_configurable_fn()
    assert isinstance(model, moe_model_class("encoder_decoder"))
  finally:
    gin.clear_config()
