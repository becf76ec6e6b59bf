"""Tables of records (the `rows()` of the analyses) as CSV or markdown."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence


def _cell(value: Any) -> str:
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
  """A markdown table: a column per key of the first row."""
  keys = list(rows[0])
  lines = ["| " + " | ".join(keys) + " |",
           "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(_cell(row[k]) for k in keys) + " |"
            for row in rows]
  return "\n".join(lines)


def format_csv(rows: Sequence[dict[str, Any]]) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


def write_table(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
  """Writes `rows` as CSV (a '.csv' path) or markdown (any other).

  Raises:
    ValueError: no rows.
  """
  if not rows:
    raise ValueError(f"no rows to write to {path}")
  path = Path(path)
  text = (format_csv(rows) if path.suffix == ".csv" else
          format_markdown(rows) + "\n")
  path.write_text(text)
  return path
