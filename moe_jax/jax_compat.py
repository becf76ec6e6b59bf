"""The private JAX APIs moe_jax relies on, each behind one function.

Written for jax 0.10 (tested: 0.10.2) through 0.12; each function says what
it reads and why no public API does. When one breaks on a new jax, fix it
here, not at its callers.
"""

from __future__ import annotations

import jax


def coordination_client():
  """The client of JAX's coordination service (after
  `jax.distributed.initialize`); jax 0.10-0.12 expose it only as
  `jax._src.distributed.global_state.client`.

  Raises:
    RuntimeError: this jax keeps the client elsewhere, or none was started.
  """
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    client = distributed.global_state.client
  except (ImportError, AttributeError) as error:
    raise RuntimeError(
        f"jax {jax.__version__}: no coordination client at "
        "jax._src.distributed.global_state.client; update "
        "moe_jax/jax_compat.py") from error
  if client is None:
    raise RuntimeError("no coordination client: call "
                       "jax.distributed.initialize first")
  return client
