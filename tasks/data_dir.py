"""Where copies of datasets live: gin knob, then env var, then default.

A local folder or a remote one (gs://bucket/data; `moe_jax.paths`).
Resolved at first use (never at import) so `import tasks` needs no files.
"""

import os

import gin

from moe_jax import paths

ENV_VAR = "MOE_JAX_DATA_DIR"
DEFAULT_DATA_DIR = "~/moe_jax_data"


@gin.configurable
def data_dir(path: str = "") -> str:
  """Root of the data: `data_dir.path` (gin), else $MOE_JAX_DATA_DIR, else
  ~/moe_jax_data."""
  return os.path.expanduser(path or os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR)


def require_file(relative_path: str, what: str) -> str:
  """Absolute path (or URI) of `relative_path` under data_dir();
  FileNotFoundError saying what to put where when it is missing."""
  path = paths.as_path(data_dir()) / relative_path
  if not path.exists():
    raise FileNotFoundError(
        f"{what}: expected the file {path}. Put it there, or point the data "
        f"directory elsewhere with ${ENV_VAR} or gin `data_dir.path`.")
  return os.fspath(path)
