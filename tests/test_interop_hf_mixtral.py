"""Hugging Face Mixtral import / export: logits equal HF's both ways,
dropless and capacity-bounded; safetensors files; the installed
transformers' expert layout."""

import jax
import numpy as np
import pytest

from moe_jax.interop import hf_common, hf_mixtral
from tests.hf_helpers import (assert_same_state_dict, eval_model, our_logits,
                              torch, transformers)

VOCAB = 48


def hf_config(**overrides):
  kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4,
                num_experts_per_tok=2, rms_norm_eps=1e-5,
                max_position_embeddings=64)
  kwargs.update(overrides)
  return transformers.MixtralConfig(**kwargs)


def hf_model(**overrides):
  return eval_model(transformers.MixtralForCausalLM, hf_config(**overrides))


def causal_lm_logits(model, tokens):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long)
                 ).logits.numpy()


def tokens():
  return np.random.default_rng(0).integers(1, VOCAB, (2, 9)).astype(np.int32)


def fused(model):
  """Whether the installed transformers fuses each layer's experts."""
  return hf_mixtral._FUSED_PROBE in model.state_dict()


@pytest.mark.parametrize("capacity_factor", [None, 8.0])
def test_logits_equal_hf_both_ways(capacity_factor, tmp_path):
  model = hf_model()
  config = hf_mixtral.config_from_hf(model.config,
                                     capacity_factor=capacity_factor)
  assert config.kv_heads == 2 and config.norm_epsilon == 1e-5
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  params = hf_mixtral.import_mixtral(
      hf_common.load_safetensors(tmp_path / "hf"), config)
  ours = our_logits(params, config, tokens())
  expected = causal_lm_logits(model, tokens())
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)

  exported = hf_mixtral.export_mixtral(params, config,
                                       fused_experts=fused(model))
  assert_same_state_dict(exported, model)
  out = tmp_path / "out"
  out.mkdir()
  hf_common.save_safetensors(exported, out / "model.safetensors")
  model.config.save_pretrained(out)
  reloaded = transformers.MixtralForCausalLM.from_pretrained(
      out, use_safetensors=True).eval()
  np.testing.assert_allclose(causal_lm_logits(reloaded, tokens()), ours,
                             rtol=0, atol=1e-4)


def test_small_capacity_drops_tokens():
  # Sanity for the capacity case above: with few slots, tokens drop and
  # the logits move away from HF's dropless ones.
  model = hf_model()
  config = hf_mixtral.config_from_hf(model.config, capacity_factor=0.25)
  params = hf_mixtral.import_mixtral(model.state_dict(), config)
  assert not np.allclose(our_logits(params, config, tokens()),
                         causal_lm_logits(model, tokens()), atol=1e-3)


@pytest.mark.parametrize("fused_experts", [False, True])
def test_each_expert_layout_round_trips(fused_experts):
  # Both layouts, whichever transformers is installed.
  model = hf_model()
  config = hf_mixtral.config_from_hf(model.config)
  params = hf_mixtral.import_mixtral(model.state_dict(), config)
  exported = hf_mixtral.export_mixtral(params, config,
                                       fused_experts=fused_experts)
  assert (hf_mixtral._FUSED_PROBE in exported) == fused_experts
  jax.tree.map(np.testing.assert_array_equal,
               hf_mixtral.import_mixtral(exported, config), params)


def test_bfloat16_file_reads_lazily_as_the_model(tmp_path):
  model = hf_model().to(torch.bfloat16)
  model.save_pretrained(tmp_path, safe_serialization=True)
  weights = hf_common.load_safetensors(tmp_path)
  assert isinstance(weights["lm_head.weight"], hf_common.SafetensorsArray)
  config = hf_mixtral.config_from_hf(model.config)
  jax.tree.map(np.testing.assert_array_equal,
               hf_mixtral.import_mixtral(weights, config),
               hf_mixtral.import_mixtral(model.state_dict(), config))


@pytest.mark.parametrize("overrides, knob", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(sliding_window=4), "sliding_window"),
])
def test_rejects_unsupported_configs(overrides, knob):
  with pytest.raises(ValueError, match=knob):
    hf_mixtral.config_from_hf(hf_config(**overrides))
