"""Test-wide settings, applied before any test imports jax."""

import os
import sys

# Tests compile many tiny programs; XLA's CPU backend optimizations cost more
# compile time than they save at these sizes. Numbers are unaffected.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                             _FAST_COMPILE).strip()

# Never load Triton in a test process. TensorFlow (imported by seqio, so by
# the task tests) makes its bundled LLVM global (RTLD_GLOBAL); torch's CUDA
# builds import Triton from torch._dynamo, which transformers reaches when it
# builds a model, and libtriton.so then binds its own LLVM calls to
# TensorFlow's copy: its static constructors crash the process (SIGSEGV)
# whenever TensorFlow was imported first. The tests run torch eagerly on the
# CPU and compile nothing with it, so torch without Triton is all they need;
# with the module marked absent, torch's `import triton` fails cleanly
# (ImportError) in any import order. tests/test_process_guard.py holds it.
if "triton" not in sys.modules:
  sys.modules["triton"] = None

# gs:// paths in tests go to the offline fake of tests/fake_gcs.py (an fsspec
# filesystem), never to TensorFlow's GCS client: etils.epath picks its gs://
# backend from this variable once per process, at its first path.
os.environ.setdefault("EPATH_USE_TF", "false")
