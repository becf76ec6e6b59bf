"""Parsing gin files and `--gin.KEY=VALUE` flags the way every CLI here does.

Files are given by path (e.g. gin/models/switch_base_8.gin); `include`
statements inside them name paths from the repository root
(`include 'gin/models/arch/t5_1_1.gin'`) and resolve from any working
directory. A file may be remote (gs://bucket/run/config.gin): gin reads
URIs through etils.epath.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Sequence

import gin
from etils import epath

from moe_jax import gin_upgrade, paths

GIN_ROOT = Path(__file__).resolve().parent.parent / "gin"
_FLAG_PREFIX = "--gin."


def split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--gin.KEY=VALUE` flags (as gin bindings) from the rest."""
  bindings, rest = [], []
  for arg in argv:
    if arg.startswith(_FLAG_PREFIX):
      binding = arg[len(_FLAG_PREFIX):]
      if "=" not in binding:
        raise ValueError(f"gin flag must look like --gin.KEY=VALUE; got {arg!r}")
      bindings.append(binding)
    else:
      rest.append(arg)
  return bindings, rest


def parse(files: Sequence[str], bindings: Sequence[str] = ()) -> None:
  """Clears gin, then parses `files` in order and `bindings` last.

  Runs gin's finalize hooks (which name a macro left %gin.REQUIRED) but
  leaves gin unlocked, so that a module imported later in the same process
  can still register configurables: T5X, a task module, a notebook's own
  code after a run.

  Raises:
    ValueError: no file given, a file missing, a file written for an older
      moe_jax (with the command that updates it, `moe_jax.gin_upgrade`), or
      gin's own error (unknown configurable or parameter, bad value), with
      the file or binding named.
  """
  if not files:
    raise ValueError("give at least one --gin_file (e.g. "
                     "--gin_file=gin/models/t5_1_1_tiny_moe.gin)")
  for name in files:
    if not _local_or_remote(name).is_file() and not (
        GIN_ROOT.parent / name).is_file():
      raise ValueError(f"gin file not found: {name}")
  for name in files:
    path = _local_or_remote(name)
    path = path if path.is_file() else GIN_ROOT.parent / name
    gin_upgrade.check(path.read_text(), str(path))
  for binding in bindings:
    why = gin_upgrade.reason(binding)
    if why:
      raise ValueError(f"--gin.{binding}: {why}")
  gin.clear_config()
  gin.add_config_file_search_path(str(GIN_ROOT.parent))
  gin.parse_config_files_and_bindings(list(files), list(bindings),
                                      finalize_config=False)
  with gin.unlock_config():  # restores the unlocked state `finalize` locks
    gin.finalize()


def _local_or_remote(name: str) -> Path | epath.Path:
  """A gin file name as a path: epath for a URI, pathlib (relative to the
  working directory) otherwise."""
  return epath.Path(name) if paths.is_remote(name) else Path(name)


def _is_remote_file(name: str) -> bool:
  return paths.is_remote(name) and epath.Path(name).is_file()


gin.config.register_file_reader(lambda name: epath.Path(name).open(),
                                _is_remote_file)


_MACRO_BINDING = re.compile(r"^\s*([A-Za-z_]\w*)\s*=")


def check_macros_used(bindings: Sequence[str], config_text: str) -> None:
  """Raises ValueError when a binding sets a macro (`NAME=value`, no dot)
  that nothing in `config_text` references as `%NAME`: a typo that would
  otherwise train the default. Names the closest macro that is used.
  For command-line flags (a library caller may bind a macro one model
  uses and another does not)."""
  for binding in bindings:
    match = _MACRO_BINDING.match(binding)
    if not match or re.search(rf"%{match.group(1)}\b", config_text):
      continue
    name = match.group(1)
    used = sorted(set(re.findall(r"%([A-Za-z_]\w*)", config_text)))
    close = difflib.get_close_matches(name, used, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ValueError(f"--gin.{binding.strip()}: no binding uses the macro "
                     f"{name}{hint}")
