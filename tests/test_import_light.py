"""The core stays light: importing the MoE package pulls in no data stack."""

import subprocess
import sys


def test_moe_core_imports_no_tensorflow_seqio_or_torch():
  code = ("import sys, moe_jax.moe.layer, moe_jax.moe.routers, "
          "moe_jax.moe.expert_parallel; "
          "heavy = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets', "
          "'torch') if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout + result.stderr
