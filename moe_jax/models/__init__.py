"""Models: T5 encoder-decoder and decoder-only, dense or sparse, from gin.

  config = configured_model_config()   # after gin has parsed the files
  model = build_model(config)
  variables = model.init(rngs, **dummy_batch(config, 2, 16, 8),
                         enable_dropout=False)
"""

from __future__ import annotations

import gin
import numpy as np

from moe_jax.models.config import (Architecture, MoeConfig,
                                   TransformerConfig)
from moe_jax.models.decoder_only import DecoderOnly
from moe_jax.models.outputs import ModelOutput
from moe_jax.models.t5 import EncoderDecoder

__all__ = ["Architecture", "DecoderOnly", "EncoderDecoder", "ModelOutput",
           "MoeConfig", "TransformerConfig", "build_model",
           "configured_model_config", "dummy_batch"]

MODEL_CONFIG_MACRO = "MODEL_CONFIG"


def build_model(config: TransformerConfig):
  """The flax module for `config`."""
  if Architecture(config.architecture) == Architecture.DECODER_ONLY:
    return DecoderOnly(config)
  return EncoderDecoder(config)


@gin.configurable("moe_jax_model_config")
def _model_config(config: TransformerConfig = gin.REQUIRED):
  return config


def configured_model_config() -> TransformerConfig:
  """The `TransformerConfig` bound to the MODEL_CONFIG macro by the parsed
  gin files (every file under gin/models/ binds it)."""
  with gin.unlock_config():
    gin.parse_config(
        f"moe_jax_model_config.config = %{MODEL_CONFIG_MACRO}")
  config = _model_config()
  if not isinstance(config, TransformerConfig):
    raise ValueError(f"{MODEL_CONFIG_MACRO} must be a TransformerConfig; got "
                     f"{type(config).__name__}")
  return config


def dummy_batch(config: TransformerConfig, batch: int, input_length: int,
                target_length: int) -> dict[str, np.ndarray]:
  """Model inputs of the right shapes (token 2 everywhere), for init and
  abstract evaluation. Decoder-only models see inputs and targets as one
  sequence of input_length + target_length tokens."""
  ones = lambda length: np.full((batch, length), 2, np.int32)
  if Architecture(config.architecture) == Architecture.DECODER_ONLY:
    return {"decoder_input_tokens": ones(input_length + target_length),
            "decoder_target_tokens": ones(input_length + target_length)}
  return {"encoder_input_tokens": ones(input_length),
          "decoder_input_tokens": ones(target_length),
          "decoder_target_tokens": ones(target_length)}
