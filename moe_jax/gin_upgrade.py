"""Updates a gin file written for an older moe_jax (e.g. a run's config.gin).

  python -m moe_jax.gin_upgrade MODEL_DIR/config.gin [MORE.gin ...]

rewrites each file in place. Two changes made older files fail to parse:

1. The MoE core moved into `moe_jax.moe` (routers into `moe_jax.moe.routers`,
   `layers` became `moe_jax.moe.layer`, `upcycle` moved under `moe_jax.train`).
2. The MoE layer's knobs are the fields of `moe_jax.moe.layer.MoeLayer`:
   `config.MoeConfig` keeps only its own fields (sparse_every,
   extra_dense_ffn) and holds the layer, so
     encoder/config.MoeConfig.router = ...  ->  encoder/layer.MoeLayer.router
   and `config.MoeConfig.layer = @layer.MoeLayer()` is added (gin evaluates
   it in the scope of each `@encoder/config.MoeConfig()`, so scoped layer
   bindings still reach their stack).

`gin_utils.parse` calls `check` on every file and fails with this command.
Bindings may be flat (`a.B.c = v`, what runs save) or in `a.B:` blocks with
one binding a line.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Optional

from moe_jax.models.config import MoeConfig

COMMAND = "python -m moe_jax.gin_upgrade"

# Old module -> (new package, new module name).
_MOVED = {
    "routing": ("moe_jax.moe", "routers"),
    "routers": ("moe_jax.moe", "routers"),
    "layers": ("moe_jax.moe", "layer"),
    "dispatch": ("moe_jax.moe", "dispatch"),
    "experts": ("moe_jax.moe", "experts"),
    "expert_parallel": ("moe_jax.moe", "expert_parallel"),
    "losses": ("moe_jax.moe", "losses"),
    "capture": ("moe_jax.moe", "capture"),
    "metric_names": ("moe_jax.moe", "metric_names"),
    "upcycle": ("moe_jax.train", "upcycle"),
}
_OLD = "|".join(_MOVED)
_IMPORT = re.compile(rf"^from moe_jax import ({_OLD})\s*$")
_FROM_OLD = re.compile(rf"^from moe_jax\.({_OLD})(\.\S+)? import (.*)$")
# Fields of MoeConfig itself; every other MoeConfig knob is now a layer knob.
_OWN = tuple(f.name for f in dataclasses.fields(MoeConfig))
_MOE_BINDING = re.compile(
    r"^(\s*)((?:[\w.]+/)*)config\.MoeConfig\.(\w+)(\s*=.*)$")
_MOE_BLOCK = re.compile(r"^((?:[\w.]+/)*)config\.MoeConfig:\s*$")
_BLOCK_LINE = re.compile(r"^\s+(\w+)(\s*=.*)$")
_LAYER_IMPORT = "from moe_jax.moe import layer"
_LAYER_BINDING = "config.MoeConfig.layer = @layer.MoeLayer()"


def _flatten_moe_blocks(lines: list[str]) -> list[str]:
  """`scope/config.MoeConfig:` blocks as flat `scope/config.MoeConfig.k = v`."""
  out, prefix = [], None
  for line in lines:
    block = _MOE_BLOCK.match(line)
    if block:
      prefix = f"{block.group(1)}config.MoeConfig."
      continue
    inside = _BLOCK_LINE.match(line) if prefix is not None else None
    if inside:
      out.append(prefix + inside.group(1) + inside.group(2))
      continue
    prefix = None
    out.append(line)
  return out


def _old_knob(line: str) -> Optional[re.Match]:
  match = _MOE_BINDING.match(line)
  return match if match and match.group(3) not in _OWN else None


def reason(text: str) -> Optional[str]:
  """Why `text` needs `upgrade`, or None when it is current."""
  lines = _flatten_moe_blocks(text.splitlines())
  for line in lines:
    if _IMPORT.match(line) or _FROM_OLD.match(line):
      return (f"it imports {line.strip()!r}, a module that moved into "
              "moe_jax.moe (routers: moe_jax.moe.routers)")
  for line in lines:
    match = _old_knob(line)
    if match:
      return (f"it binds config.MoeConfig.{match.group(3)}, a knob of "
              "layer.MoeLayer now (config.MoeConfig.layer holds the layer)")
  return None


def upgrade(text: str) -> str:
  """`text` with moved modules and MoE layer knobs renamed (see above)."""
  out, imports, moved_knob = [], set(), False
  for line in _flatten_moe_blocks(text.splitlines()):
    old = _IMPORT.match(line)
    if old:
      package, module = _MOVED[old.group(1)]
      line = f"from {package} import {module}"
    old = _FROM_OLD.match(line)
    if old:
      package, module = _MOVED[old.group(1)]
      submodule = old.group(2) or ""
      line = f"from {package}.{module}{submodule} import {old.group(3)}"
    if line.startswith(("from ", "import ")):
      if line in imports:
        continue
      imports.add(line)
    for before, after in (("routing", "routers"), ("layers", "layer")):
      if f"from moe_jax import {before}" in text:
        line = re.sub(rf"(^|[^.\w]){before}\.", rf"\1{after}.", line)
    match = _old_knob(line)
    if match:
      indent, scope, knob, value = match.groups()
      line = f"{indent}{scope}layer.MoeLayer.{knob}{value}"
      moved_knob = True
    out.append(line)
  if moved_knob and _LAYER_BINDING not in out:
    if _LAYER_IMPORT not in imports:
      # After the last import: gin needs the module before its bindings.
      last = max(i for i, line in enumerate(out)
                 if line.startswith(("from ", "import ")))
      out.insert(last + 1, _LAYER_IMPORT)
    out += ["", "# Added by moe_jax.gin_upgrade: the MoE layer of each stack.",
            _LAYER_BINDING]
  return "\n".join(out) + "\n"


def check(text: str, source: str) -> None:
  """Raises ValueError, with the command that fixes it, when `text` (the gin
  file `source`) was written for an older moe_jax."""
  why = reason(text)
  if why:
    raise ValueError(f"{source} was written for an older moe_jax: {why}; "
                     f"update the file with\n  {COMMAND} {source}")


def main(argv: list[str]) -> int:
  if not argv:
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2
  for name in argv:
    path = Path(name)
    path.write_text(upgrade(path.read_text()))
    print(f"updated {name}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
