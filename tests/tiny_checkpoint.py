"""Writes a tiny sparse T5 checkpoint (config.gin + orbax steps) for tests.

  python -m tests.tiny_checkpoint MODEL_DIR
"""

import sys

import gin
import numpy as np

from moe_jax import gin_utils
from moe_jax.models import build_model, configured_model_config
from moe_jax.train import checkpoints, loop, objective, optimizers

GIN_FILE = "gin/models/t5_1_1_tiny_moe.gin"
# 4 experts, top-2, every layer sparse (2 encoder + 2 decoder MoE layers);
# a small eval capacity so that inspection sees dropped tokens.
BINDINGS = ("NUM_EXPERTS = 4", "SPARSE_EVERY = 1", "EMBED_DIM = 16",
            "MLP_DIM = 32", "HEAD_DIM = 8", "VOCAB_SIZE = 260",
            "EVAL_CAPACITY_FACTOR = 0.5")
BATCH, INPUT_LENGTH, TARGET_LENGTH = 4, 12, 8


def batch_fn(step: int) -> dict[str, np.ndarray]:
  """Random byte-vocabulary tokens (ids 3..258), no padding."""
  rng = np.random.default_rng(step)
  targets = rng.integers(3, 259, (BATCH, TARGET_LENGTH)).astype(np.int32)
  return {
      "encoder_input_tokens": rng.integers(
          3, 259, (BATCH, INPUT_LENGTH)).astype(np.int32),
      "decoder_input_tokens": np.concatenate(
          [np.zeros((BATCH, 1), np.int32), targets[:, :-1]], 1),
      "decoder_target_tokens": targets}


def write(model_dir: str, num_steps: int = 3) -> loop.LoopResult:
  """Trains `num_steps` steps, checkpointing every 2 and at the end."""
  gin_utils.parse([GIN_FILE], BINDINGS)
  model = build_model(configured_model_config())
  ckpt = checkpoints.Checkpointer(model_dir, config_text=gin.config_str(),
                                  save_every=2, async_save=False)
  optimizer = optimizers.make_optimizer(optimizers.OptimizerConfig(
      name="adamw", learning_rate=1e-2, warmup_steps=1))
  try:
    return loop.train(model, optimizer, objective.LossConfig(), batch_fn,
                      num_steps, ckpt)
  finally:
    ckpt.close()


if __name__ == "__main__":
  write(sys.argv[1])
