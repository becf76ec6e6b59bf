"""Each preset's MoE settings and capacity equal its row in docs/presets.md."""

import pathlib

import gin
import pytest

from moe_jax import gin_utils
from moe_jax.models import configured_model_config
from moe_jax.moe.routers import ExpertChoiceRouter

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLUMNS = ("preset", "stack", "source", "E", "k", "sparse layers",
           "train factor", "eval factor", "min C", "S", "C train", "C eval",
           "expert dropout", "aux loss", "z-loss", "extra dense FFN")


def _table() -> list[dict]:
  """The preset table's rows (the page's first table), as {column: cell}."""
  text = (ROOT / "docs/presets.md").read_text()
  first = text[text.index("\n|") + 1:].split("\n\n", 1)[0]
  lines = first.splitlines()
  cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]
  assert tuple(cells(lines[0])) == COLUMNS, cells(lines[0])
  return [dict(zip(COLUMNS, cells(line))) for line in lines[2:]]


ROWS = _table()


def _macro(name: str) -> float:
  value = gin.query_parameter(f"%{name}")
  if isinstance(value, gin.config.ConfigurableReference):
    value = value.scoped_configurable_fn()
  return value


def test_table_covers_the_published_presets():
  presets = {row["preset"] for row in ROWS}
  assert len(ROWS) == 2 * len(presets) >= 20
  for name in ("switch_base_128", "st_moe_32b", "flan_st_base",
               "flan_ec_base"):
    assert f"`gin/models/{name}.gin`" in presets


@pytest.mark.parametrize("row", ROWS,
                         ids=[f"{r['preset']}-{r['stack']}" for r in ROWS])
def test_preset_matches_its_row(row):
  gin_utils.parse([row["preset"].strip("`")])
  config = configured_model_config()
  moe = config.moe(row["stack"])
  layer = moe.layer
  k = ("EC" if isinstance(layer.router, ExpertChoiceRouter) else
       str(layer.router.experts_per_token))
  layers = config.num_layers(row["stack"])
  size = layer.max_group_size
  got = {
      "E": str(layer.num_experts), "k": k,
      "sparse layers": f"{layers // moe.sparse_every} of {layers}",
      "train factor": layer.train_capacity_factor,
      "eval factor": layer.eval_capacity_factor,
      "min C": str(layer.min_expert_capacity), "S": str(size),
      "C train": str(layer.capacity(size, deterministic=False)),
      "C eval": str(layer.capacity(size, deterministic=True)),
      "expert dropout": layer.expert_dropout_rate,
      "aux loss": _macro("AUX_LOSS_FACTOR"),
      "z-loss": _macro("ROUTER_Z_LOSS_FACTOR"),
      "extra dense FFN": "yes" if moe.extra_dense_ffn else "no",
  }
  for column, value in got.items():
    want = row[column]
    if isinstance(value, float):
      assert value == pytest.approx(float(want)), column
    else:
      assert value == want, column
