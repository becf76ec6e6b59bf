"""Where local copies of datasets live: gin knob, then env var, then default.

Resolved at first use (never at import) so `import tasks` needs no files.
"""

import os

import gin

ENV_VAR = "MOE_JAX_DATA_DIR"
DEFAULT_DATA_DIR = "~/moe_jax_data"


@gin.configurable
def data_dir(path: str = "") -> str:
  """Root of local data: `data_dir.path` (gin), else $MOE_JAX_DATA_DIR, else
  ~/moe_jax_data."""
  return os.path.expanduser(path or os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR)


def require_file(relative_path: str, what: str) -> str:
  """Absolute path of `relative_path` under data_dir(); FileNotFoundError
  saying what to put where when it is missing."""
  path = os.path.join(data_dir(), relative_path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{what}: expected the file {path}. Put it there, or point the data "
        f"directory elsewhere with ${ENV_VAR} or gin `data_dir.path`.")
  return path
