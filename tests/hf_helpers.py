"""Hugging Face models as the interop tests compare against them.

Importing this module skips the importing test module when torch or
transformers is absent.
"""

import jax
import numpy as np
import pytest

from moe_jax.models import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def eval_model(model_class, config):
  """Seeded `model_class(config)` in eval mode, ready for comparison.

  Norm scales are drawn in [0.5, 1.5], away from 1, so that a mis-mapped
  scale shows. In T5-family models the stacks' input embeddings are copies
  of the shared one, as in the released checkpoints (some transformers
  versions untie them when building, and always when the LM head is
  untied); moe_jax shares one.
  """
  torch.manual_seed(0)
  model = model_class(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
    for stack in (getattr(model, "encoder", None),
                  getattr(model, "decoder", None)):
      if stack is not None:
        stack.embed_tokens.weight.copy_(model.shared.weight)
  return model


def hf_logits(model, enc: np.ndarray, dec_in: np.ndarray) -> np.ndarray:
  """HF logits <float32>[B, Ld, V] for <int32>[B, Le] and [B, Ld] tokens."""
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc, dtype=torch.long),
                 decoder_input_ids=torch.tensor(dec_in, dtype=torch.long)
                 ).logits.numpy()


def our_logits(params, config, *tokens) -> jax.Array:
  """The moe_jax model's logits <float32>[B, L, V] on the same tokens
  (encoder inputs, decoder inputs, targets; decoder-only: inputs)."""
  return jax.jit(lambda p: build_model(config).apply(
      {"params": p}, *tokens, enable_dropout=False).logits)(params)


def assert_same_state_dict(exported, model):
  """`exported` ({name: array}) holds exactly `model`'s tensors."""
  original = model.state_dict()
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_allclose(exported[key], value.numpy(), rtol=1e-6,
                               atol=1e-6, err_msg=key)
