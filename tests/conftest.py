"""Test-wide settings, applied before any test imports jax."""

import os

# Tests compile many tiny programs; XLA's CPU backend optimizations cost more
# compile time than they save at these sizes. Numbers are unaffected.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                             _FAST_COMPILE).strip()
