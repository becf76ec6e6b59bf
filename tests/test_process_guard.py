"""The guard in conftest.py: TensorFlow, then a torch model, in one process.

This is the order the full suite takes (the task tests import TensorFlow
before the Hugging Face tests build torch models); with Triton installed and
no guard, it dies with SIGSEGV (see conftest.py).
"""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

_TENSORFLOW_THEN_TORCH = """
import sys
import tests.conftest          # what pytest runs first in every test process
import tensorflow as tf
import torch
import transformers
tf.constant(1.0).numpy()
model = transformers.T5ForConditionalGeneration(transformers.T5Config(
    vocab_size=8, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)).eval()
import torch._dynamo           # what imports Triton, where it is installed
with torch.no_grad():
  logits = model(input_ids=torch.ones((1, 3), dtype=torch.long),
                 decoder_input_ids=torch.zeros((1, 2), dtype=torch.long)).logits
print("logits", tuple(logits.shape), "triton loaded:",
      sys.modules.get("triton") is not None)
"""


def test_tensorflow_then_torch_model_runs_without_triton():
  for name in ("tensorflow", "torch", "transformers"):
    if importlib.util.find_spec(name) is None:
      pytest.skip(f"needs {name}")
  result = subprocess.run([sys.executable, "-c", _TENSORFLOW_THEN_TORCH],
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, (
      f"rc={result.returncode} (-11 is SIGSEGV)\n{result.stderr[-3000:]}")
  assert "logits (1, 2, 8) triton loaded: False" in result.stdout, (
      result.stdout + result.stderr[-3000:])
