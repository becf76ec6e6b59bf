"""Hugging Face SwitchTransformers import / export: logits equal HF's (with
and without dropped tokens); exact round trip; unsupported configs."""

import jax
import numpy as np
import pytest

from moe_jax.moe.dispatch import Dispatch
from moe_jax.interop import hf_switch
from tests.hf_helpers import (assert_same_state_dict, eval_model, hf_logits,
                              our_logits, transformers)

VOCAB, ENC_LEN, DEC_LEN = 64, 12, 7


def hf_config(**overrides):
  kwargs = dict(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2,
      num_decoder_layers=2, num_heads=4, num_experts=4,
      num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
      expert_capacity=64, relative_attention_num_buckets=8,
      relative_attention_max_distance=20, dropout_rate=0.0)
  kwargs.update(overrides)
  return transformers.SwitchTransformersConfig(**kwargs)


def hf_model(**overrides):
  return eval_model(transformers.SwitchTransformersForConditionalGeneration,
                    hf_config(**overrides))


def batch():
  rng = np.random.default_rng(0)
  enc = rng.integers(1, VOCAB, (3, ENC_LEN)).astype(np.int32)
  dec_in = np.concatenate(
      [np.zeros((3, 1), np.int32),
       rng.integers(1, VOCAB, (3, DEC_LEN - 1)).astype(np.int32)], 1)
  dec_tgt = rng.integers(1, VOCAB, (3, DEC_LEN)).astype(np.int32)
  return enc, dec_in, dec_tgt


@pytest.mark.parametrize("per_sequence", [False, True])
def test_logits_equal_hf_and_round_trip(per_sequence):
  model = hf_model()
  lengths = (dict(encoder_length=ENC_LEN, decoder_length=DEC_LEN) if
             per_sequence else {})
  config = hf_switch.config_from_hf(model.config, **lengths)
  assert config.logits_via_embedding   # HF ties and scales by D^-0.5
  assert config.encoder_moe.sparse_every == 2
  assert config.decoder_moe.sparse_every == 2
  assert Dispatch(config.encoder_moe.layer.dispatch) == (
      Dispatch.SCATTER if per_sequence else Dispatch.DROPLESS)
  params = hf_switch.import_switch(model.state_dict(), config)
  enc, dec_in, dec_tgt = batch()
  np.testing.assert_allclose(our_logits(params, config, enc, dec_in, dec_tgt),
                             hf_logits(model, enc, dec_in),
                             rtol=1e-4, atol=1e-4)
  # A safetensors file holds numpy arrays and drops the tied copies.
  tied = ("lm_head.weight", "encoder.embed_tokens.weight",
          "decoder.embed_tokens.weight")
  from_numpy = hf_switch.import_switch(
      {k: v.numpy() for k, v in model.state_dict().items() if k not in tied},
      config)
  jax.tree.map(np.testing.assert_array_equal, from_numpy, params)

  assert_same_state_dict(hf_switch.export_switch(params, config), model)


def test_dropped_tokens_match_hf_per_sequence():
  # 4 experts, 12 encoder tokens per sequence, 2 slots each: tokens drop.
  model = hf_model(expert_capacity=2)
  config = hf_switch.config_from_hf(model.config, encoder_length=ENC_LEN,
                                    decoder_length=DEC_LEN)
  params = hf_switch.import_switch(model.state_dict(), config)
  enc, dec_in, dec_tgt = batch()
  expected = hf_logits(model, enc, dec_in)
  np.testing.assert_allclose(our_logits(params, config, enc, dec_in, dec_tgt),
                             expected, rtol=1e-4, atol=1e-4)
  # Sanity: the drops matter, dropless routing gives other logits.
  dropless = hf_switch.config_from_hf(model.config)
  assert not np.allclose(our_logits(params, dropless, enc, dec_in, dec_tgt),
                         expected, atol=1e-3)


def test_untied_every_layer_sparse():
  model = hf_model(tie_word_embeddings=False, num_sparse_encoder_layers=2,
                   num_sparse_decoder_layers=2)
  config = hf_switch.config_from_hf(model.config)
  assert not config.logits_via_embedding
  assert config.encoder_moe.sparse_every == 1
  params = hf_switch.import_switch(model.state_dict(), config)
  enc, dec_in, dec_tgt = batch()
  np.testing.assert_allclose(our_logits(params, config, enc, dec_in, dec_tgt),
                             hf_logits(model, enc, dec_in),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides, knob", [
    (dict(router_bias=True), "router_bias"),
    (dict(dense_act_fn="gelu"), "dense_act_fn"),
    (dict(router_dtype="bfloat16"), "router_dtype"),
    (dict(layer_norm_epsilon=1e-5), "layer_norm_epsilon"),
    (dict(num_layers=3, num_sparse_encoder_layers=1), "encoder_sparse_step"),
])
def test_rejects_unsupported_configs(overrides, knob):
  with pytest.raises(ValueError, match=knob):
    hf_switch.config_from_hf(hf_config(**overrides))
