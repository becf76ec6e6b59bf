"""The core stays light: importing the layer pulls in no data stack."""

import subprocess
import sys


def test_layers_import_no_tensorflow_or_seqio():
  code = ("import sys, moe_jax.layers, moe_jax.routing, moe_jax.dispatch; "
          "heavy = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets') "
          "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout + result.stderr
