"""Hugging Face T5 v1.1 import / export: logits equal HF's; round trip."""

import numpy as np
import pytest

from moe_jax.interop import hf_t5
from tests.hf_helpers import (assert_same_state_dict, eval_model, hf_logits,
                              our_logits, transformers)


def hf_model():
  config = transformers.T5Config(
      vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2,
      num_decoder_layers=3, num_heads=3, relative_attention_num_buckets=8,
      relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
      dropout_rate=0.0)
  config.tie_word_embeddings = False   # T5 v1.1 (some versions drop the kwarg)
  config.scale_decoder_outputs = False
  return eval_model(transformers.T5ForConditionalGeneration, config)


def test_logits_equal_hf_and_round_trip():
  model = hf_model()
  config = hf_t5.config_from_hf(model.config)
  params = hf_t5.import_t5(model.state_dict(), config)
  rng = np.random.default_rng(0)
  enc = rng.integers(1, 40, (2, 11)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((2, 1), np.int32),
                           rng.integers(1, 40, (2, 6)).astype(np.int32)], 1)
  dec_tgt = rng.integers(1, 40, (2, 7)).astype(np.int32)
  np.testing.assert_allclose(our_logits(params, config, enc, dec_in, dec_tgt),
                             hf_logits(model, enc, dec_in),
                             rtol=1e-4, atol=1e-4)

  assert_same_state_dict(hf_t5.export_t5(params, config), model)


def test_rejects_tied_or_relu_configs():
  with pytest.raises(ValueError, match="feed_forward_proj"):
    hf_t5.config_from_hf(transformers.T5Config(feed_forward_proj="relu"))
  with pytest.raises(ValueError, match="tie_word_embeddings"):
    config = transformers.T5Config(feed_forward_proj="gated-gelu")
    config.tie_word_embeddings = True
    hf_t5.config_from_hf(config)
