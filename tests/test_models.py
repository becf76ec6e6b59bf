"""Models: sparse layout, scan == unrolled, cached decoding == full pass."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import (MoeConfig, TransformerConfig, build_model,
                            dummy_batch)
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import ExpertChoiceRouter, TokenChoiceRouter


def tiny(**overrides):
  # Eval capacity factor 8: no token drops, so routing does not depend on
  # how tokens are grouped (full pass vs one decode step).
  moe = MoeConfig(layer=MoeLayer(
      router=TokenChoiceRouter(num_selected_experts=2), num_experts=4,
      eval_capacity_factor=8.0, min_expert_capacity=1), sparse_every=2)
  fields = dict(vocab_size=50, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=24,
                num_encoder_layers=2, num_decoder_layers=2, encoder_moe=moe,
                decoder_moe=moe)
  fields.update(overrides)
  return TransformerConfig(**fields)


def random_batch(config, batch=2, inputs=7, targets=5, seed=0):
  rng = np.random.default_rng(seed)
  out = {k: rng.integers(2, config.vocab_size, v.shape).astype(np.int32)
         for k, v in dummy_batch(config, batch, inputs, targets).items()}
  return out


def init(model, batch, **kwargs):
  run = functools.partial(model.init, enable_dropout=False, **kwargs)
  return jax.jit(run)(jax.random.PRNGKey(0), **batch)


def forward(model, params, batch, **kwargs):
  run = lambda p, b: model.apply(p, **b, enable_dropout=False, **kwargs)
  return jax.jit(run)(params, batch)


def stack_blocks(params):
  """Unrolled params {block_i: p_i} -> scanned params {blocks: stack(p_i)}."""
  params = nn.unbox(params)
  out = {}
  for name, sub in params.items():
    if not isinstance(sub, dict):
      out[name] = sub
    elif "block_0" in sub:
      blocks = [sub[f"block_{i}"] for i in range(len(
          [k for k in sub if k.startswith("block_")]))]
      rest = {k: v for k, v in sub.items() if not k.startswith("block_")}
      out[name] = {**rest, "blocks": jax.tree.map(lambda *a: jnp.stack(a),
                                                  *blocks)}
    else:
      out[name] = stack_blocks(sub)
  return out


def test_sparse_layers_are_the_last_of_each_block():
  config = tiny(num_encoder_layers=4)
  params = nn.unbox(init(build_model(config), random_batch(config)))["params"]
  encoder = params["encoder"]
  assert sorted(k for k in encoder if k.startswith("block_")) == [
      "block_0", "block_1"]
  for block in ("block_0", "block_1"):
    assert "mlp" in encoder[block]["layer_0"]
    assert "moe" in encoder[block]["layer_1"]
    assert encoder[block]["layer_1"]["moe"]["experts"]["wi_0"].shape == (
        4, 16, 24)
  assert "moe" in params["decoder"]["block_0"]["layer_1"]


def test_moe_stats_have_one_row_per_sparse_layer():
  config = tiny()
  model = build_model(config)
  batch = random_batch(config)
  out = forward(model, init(model, batch), batch)
  assert out.logits.shape == (2, 5, 50)
  assert out.moe_stats.auxiliary_loss.shape == (2,)  # encoder, decoder
  assert out.moe_stats.expert_load.shape == (2, 4)
  # Every real token routed twice (k = 2) in every sparse layer.
  np.testing.assert_allclose(out.moe_stats.expert_load.sum(-1), [28, 20])


def test_dense_model_has_no_stats():
  config = tiny(encoder_moe=None, decoder_moe=None)
  model = build_model(config)
  batch = random_batch(config)
  assert forward(model, init(model, batch), batch).moe_stats is None


@pytest.mark.parametrize("architecture,remat", [("encoder_decoder", "none"),
                                                 ("decoder_only", "full")])
def test_scan_equals_unrolled(architecture, remat):
  extra = {} if architecture == "encoder_decoder" else dict(
      architecture="decoder_only", num_encoder_layers=0, encoder_moe=None)
  unrolled = tiny(**extra)
  scanned = tiny(**extra, scan_layers=True, remat_policy=remat)
  batch = random_batch(unrolled)
  params = init(build_model(unrolled), batch)

  def loss(model, params):
    out = model.apply(params, **batch, enable_dropout=False)
    return jnp.mean(out.logits ** 2) + jnp.sum(out.moe_stats.auxiliary_loss)

  value_and_grad = lambda config: jax.jit(jax.value_and_grad(
      lambda p: loss(build_model(config), {"params": p})))
  value_u, grad_u = value_and_grad(unrolled)(nn.unbox(params)["params"])
  value_s, grad_s = value_and_grad(scanned)(stack_blocks(params)["params"])
  np.testing.assert_allclose(value_u, value_s, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               stack_blocks({"params": grad_u})["params"], grad_s)


def _greedy_steps(step_fn, cache, tokens):
  step_fn = jax.jit(step_fn)
  logits = []
  for t in range(tokens.shape[1]):
    out, cache = step_fn(cache, tokens[:, t:t + 1])
    logits.append(out[:, 0])
  return jnp.stack(logits, 1)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_equals_full_pass_encoder_decoder(scan):
  config = tiny(scan_layers=scan)
  model = build_model(config)
  batch = random_batch(config)
  params = init(model, batch)["params"]
  full = forward(model, {"params": params}, batch).logits
  cache = init(model, batch, decode=True)["cache"]
  encoded, _ = jax.jit(lambda p, t: model.apply(
      p, t, enable_dropout=False, method="encode"))(
          {"params": params}, batch["encoder_input_tokens"])

  def step(cache, token):
    (logits, _), state = model.apply(
        {"params": params, "cache": cache}, encoded,
        batch["encoder_input_tokens"], token, enable_dropout=False,
        decode=True, method="decode", mutable=["cache"])
    return logits, state["cache"]

  stepped = _greedy_steps(step, cache, batch["decoder_input_tokens"])
  np.testing.assert_allclose(stepped, full, atol=2e-5)


@pytest.mark.parametrize("position_embedding", ["relative", "rope"])
def test_cached_decoding_equals_full_pass_decoder_only(position_embedding):
  config = tiny(architecture="decoder_only", num_encoder_layers=0,
                encoder_moe=None, position_embedding=position_embedding)
  model = build_model(config)
  batch = random_batch(config, inputs=3, targets=5)
  params = init(model, batch)["params"]
  full = forward(model, {"params": params}, batch).logits
  cache = init(model, batch, decode=True)["cache"]

  def step(cache, token):
    out, state = model.apply({"params": params, "cache": cache}, token,
                             enable_dropout=False, decode=True,
                             mutable=["cache"])
    return out.logits, state["cache"]

  stepped = _greedy_steps(step, cache, batch["decoder_input_tokens"])
  np.testing.assert_allclose(stepped, full, atol=2e-5)


def test_prefill_then_decode_matches_prefix_lm():
  config = tiny(architecture="decoder_only", num_encoder_layers=0,
                encoder_moe=None)
  model = build_model(config)
  batch = random_batch(config, inputs=3, targets=5)
  tokens = batch["decoder_input_tokens"]
  prompt = np.array([3, 5])  # prompt length of each example
  prefix = (np.arange(8)[None] < prompt[:, None]).astype(np.int32)
  params = init(model, batch)["params"]
  full = forward(model, {"params": params},
                 {"decoder_input_tokens": tokens,
                  "decoder_causal_attention": prefix}).logits
  cache = init(model, batch, decode=True)["cache"]
  prompt_only = np.where(prefix > 0, tokens, 0)
  out, state = jax.jit(lambda v: model.apply(
      v, prompt_only, decoder_causal_attention=prefix, enable_dropout=False,
      decode=True, prefill=True, prefill_lengths=jnp.asarray(prompt),
      mutable=["cache"]))({"params": params, "cache": cache})
  cache = state["cache"]
  for b, length in enumerate(prompt):
    np.testing.assert_allclose(out.logits[b, :length], full[b, :length],
                               atol=2e-5)
  # Continue each example from the end of its own prompt.
  step = jax.jit(lambda v, t: model.apply(v, t, enable_dropout=False,
                                          decode=True, mutable=["cache"]))
  for t in range(3):
    step_tokens = tokens[np.arange(2), prompt + t][:, None]
    out, state = step({"params": params, "cache": cache}, step_tokens)
    cache = state["cache"]
    np.testing.assert_allclose(out.logits[:, 0],
                               full[np.arange(2), prompt + t], atol=2e-5)


def test_padding_does_not_change_real_positions():
  config = tiny()
  model = build_model(config)
  batch = random_batch(config, batch=1)
  params = init(model, batch)
  out = forward(model, params, batch).logits
  padded = {k: np.pad(v, [(0, 0), (0, 3)]) for k, v in batch.items()}
  out_padded = forward(model, params, padded).logits
  np.testing.assert_allclose(out_padded[:, :5], out, atol=2e-5)


def test_mixtral_style_variant_runs_forward_and_backward():
  moe = MoeConfig(layer=MoeLayer(
      router=TokenChoiceRouter(num_selected_experts=2, renormalize_gates=True),
      num_experts=4, activation="swiglu", dispatch="dropless"), sparse_every=1)
  config = tiny(architecture="decoder_only", num_encoder_layers=0,
                encoder_moe=None, decoder_moe=moe, position_embedding="rope",
                activation="swiglu", logits_via_embedding=True)
  model = build_model(config)
  batch = random_batch(config)
  params = init(model, batch)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply(
      p, **batch, enable_dropout=True,
      rngs={"dropout": jax.random.PRNGKey(1)}).logits ** 2)))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert "logits_dense" not in nn.unbox(params)["params"]["embedder"]


def test_bad_configs_fail_with_the_knob():
  with pytest.raises(ValueError, match="sparse_every=3"):
    tiny(encoder_moe=MoeConfig(layer=MoeLayer(router=TokenChoiceRouter()),
                               sparse_every=3))
  with pytest.raises(ValueError,
                     match="decoder_moe.layer: router=ExpertChoiceRouter"):
    tiny(decoder_moe=MoeConfig(layer=MoeLayer(router=ExpertChoiceRouter())))
  # Fine in the encoder.
  tiny(encoder_moe=MoeConfig(layer=MoeLayer(router=ExpertChoiceRouter())))
  with pytest.raises(ValueError, match="remat_policy='sometimes'"):
    tiny(remat_policy="sometimes")
  with pytest.raises(ValueError, match="num_encoder_layers=0"):
    tiny(num_encoder_layers=0)
