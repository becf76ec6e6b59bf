"""Hugging Face T5 v1.1 import / export under the installed transformers:
logits equal HF's with a tied and with a separate output layer, and with
the scaled tied head of original T5; round trip; safetensors files.

transformers < 5 keeps a separate `lm_head` when tie_word_embeddings=False;
transformers 5 always ties it to `shared` and saves no `lm_head.weight`.
Both read tie_word_embeddings=False as "do not scale decoder outputs".
"""

import numpy as np
import pytest

from moe_jax.interop import hf_common, hf_t5
from tests.hf_helpers import (assert_same_state_dict, eval_model, hf_logits,
                              our_logits, torch, transformers)

VOCAB = 40


def hf_model(**overrides):
  kwargs = dict(
      vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=24, num_layers=2,
      num_decoder_layers=3, num_heads=3, relative_attention_num_buckets=8,
      relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
      dropout_rate=0.0, tie_word_embeddings=False)   # T5 v1.1
  kwargs.update(overrides)
  return eval_model(transformers.T5ForConditionalGeneration,
                    transformers.T5Config(**kwargs))


def batch():
  rng = np.random.default_rng(0)
  enc = rng.integers(1, VOCAB, (2, 11)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((2, 1), np.int32),
                           rng.integers(1, VOCAB, (2, 6)).astype(np.int32)], 1)
  dec_tgt = rng.integers(1, VOCAB, (2, 7)).astype(np.int32)
  return enc, dec_in, dec_tgt


def assert_logits_equal(model, params, config):
  enc, dec_in, dec_tgt = batch()
  np.testing.assert_allclose(our_logits(params, config, enc, dec_in, dec_tgt),
                             hf_logits(model, enc, dec_in), rtol=1e-4,
                             atol=1e-4)


def test_separate_output_layer(tmp_path):
  model = hf_model()
  with torch.no_grad():   # a head of its own (transformers 5 would tie it)
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn_like(model.shared.weight))
  config = hf_t5.config_from_hf(model.config)
  assert not config.logits_via_embedding
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  params = hf_t5.import_t5(state_dict, config)
  assert_logits_equal(model, params, config)
  exported = hf_t5.export_t5(params, config)
  assert_same_state_dict(exported, model)
  hf_common.save_safetensors(exported, tmp_path / "model.safetensors")
  np.testing.assert_array_equal(
      hf_common.load_safetensors(tmp_path / "model.safetensors")[
          "lm_head.weight"], model.lm_head.weight.detach().numpy())


def test_tied_unscaled_output_layer_saved_without_lm_head(tmp_path):
  # What transformers 5 makes and saves for T5 v1.1; under older versions
  # the same checkpoint is one whose head equals `shared`.
  model = hf_model()
  with torch.no_grad():
    model.lm_head.weight.copy_(model.shared.weight)
  model.save_pretrained(tmp_path, safe_serialization=True)
  weights = hf_common.load_safetensors(tmp_path)
  weights.pop("lm_head.weight", None)
  config = hf_t5.config_from_hf(
      transformers.T5Config.from_pretrained(tmp_path))
  params = hf_t5.import_t5(weights, config)
  assert_logits_equal(model, params, config)
  assert_same_state_dict(hf_t5.export_t5(params, config), model)


def test_tied_scaled_output_layer():
  # tie_word_embeddings=True in every version: tied head, outputs scaled.
  model = hf_model(tie_word_embeddings=True)
  config = hf_t5.config_from_hf(model.config)
  assert config.logits_via_embedding
  params = hf_t5.import_t5(model.state_dict(), config)
  assert_logits_equal(model, params, config)
  assert_same_state_dict(hf_t5.export_t5(params, config), model)


def test_rejects_relu():
  with pytest.raises(ValueError, match="feed_forward_proj"):
    hf_t5.config_from_hf(transformers.T5Config(feed_forward_proj="relu"))
