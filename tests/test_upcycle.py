"""Sparse upcycling: a sparse model built from a dense one."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from moe_jax.train import upcycle
from moe_jax.models import MoeConfig, TransformerConfig, build_model
from moe_jax.moe.layer import MoeLayer
from moe_jax.moe.routers import TokenChoiceRouter

DENSE = TransformerConfig(vocab_size=40, emb_dim=16, num_heads=2, head_dim=8,
                          mlp_dim=24, num_encoder_layers=2,
                          num_decoder_layers=2)


def sparse_config(renormalize=True, k=2):
  moe = MoeConfig(layer=MoeLayer(
      router=TokenChoiceRouter(num_selected_experts=k,
                               renormalize_gates=renormalize),
      num_experts=4, eval_capacity_factor=8.0, min_expert_capacity=1))
  return dataclasses.replace(DENSE, encoder_moe=moe, decoder_moe=moe)


def _batch():
  rng = np.random.default_rng(0)
  return {"encoder_input_tokens": rng.integers(2, 40, (2, 7), np.int32),
          "decoder_input_tokens": rng.integers(2, 40, (2, 5), np.int32),
          "decoder_target_tokens": rng.integers(2, 40, (2, 5), np.int32)}


def _params(config, seed):
  model = build_model(config)
  return model, nn.unbox(model.init(jax.random.PRNGKey(seed), **_batch(),
                                    enable_dropout=False))["params"]


def _logits(model, params):
  return model.apply({"params": params}, **_batch(),
                     enable_dropout=False).logits


def test_upcycled_model_equals_the_dense_model_at_start():
  dense_model, dense = _params(DENSE, 0)
  sparse_model, fresh = _params(sparse_config(), 1)
  params = upcycle.upcycle(dense, fresh)
  np.testing.assert_allclose(_logits(sparse_model, params),
                             _logits(dense_model, dense), atol=1e-5)
  moe = params["encoder"]["block_0"]["layer_1"]["moe"]
  np.testing.assert_array_equal(
      moe["router"]["router_weights"]["kernel"],
      fresh["encoder"]["block_0"]["layer_1"]["moe"]["router"][
          "router_weights"]["kernel"])
  for e in range(4):
    np.testing.assert_array_equal(
        moe["experts"]["wi_0"][e],
        dense["encoder"]["block_1"]["layer_0"]["mlp"]["wi_0"])  # layer 1


def test_raw_gates_scale_the_dense_output():
  # Switch-style raw top-1 gates: output = gate * dense FFN, not equal.
  dense_model, dense = _params(DENSE, 0)
  sparse_model, fresh = _params(sparse_config(renormalize=False, k=1), 1)
  params = upcycle.upcycle(dense, fresh)
  assert not np.allclose(_logits(sparse_model, params),
                         _logits(dense_model, dense), atol=1e-3)


def test_mismatched_dimensions_are_refused():
  _, dense = _params(dataclasses.replace(DENSE, mlp_dim=32), 0)
  _, fresh = _params(sparse_config(), 1)
  with pytest.raises(ValueError, match="dense shape"):
    upcycle.upcycle(dense, fresh)
