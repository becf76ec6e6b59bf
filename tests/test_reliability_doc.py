"""docs/reliability.md's fault table: every row names the tests that cover
it (or is marked **open**), and every test it names exists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
HEADER = "| fault | what happens | test |"
# `test_file.py`, `test_file.py::test_name`, or `::test_name` (in the file
# named last in the cell).
REFERENCE = re.compile(r"(test_\w+\.py)?(?:::(test_\w+))?")


def _rows() -> list[list[str]]:
  """The table's rows as [fault, what happens, test] cells."""
  lines = DOC.read_text().splitlines()
  start = lines.index(HEADER) + 2  # after the header and its rule
  rows = []
  for line in lines[start:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in re.split(r"\s\|\s", line.strip("| "))]
    assert len(cells) == 3, f"{DOC}: not 3 cells: {line}"
    rows.append(cells)
  return rows


def _test_names(path: Path) -> set[str]:
  """Test functions defined in `path`, at top level or in classes."""
  tree = ast.parse(path.read_text())
  return {node.name for node in ast.walk(tree)
          if isinstance(node, ast.FunctionDef)
          and node.name.startswith("test_")}


def test_every_row_names_tests_that_exist():
  rows = _rows()
  assert len(rows) > 20
  named = 0
  for fault, _, cell in rows:
    references = re.findall(r"`([^`]+)`", cell)
    assert references or "**open**" in fault, f"no test for {fault!r}"
    file = None
    for reference in references:
      match = REFERENCE.fullmatch(reference)
      assert match and any(match.groups()), (
          f"{fault!r}: {reference!r} is not test_<file>.py[::test_<name>]")
      file = match.group(1) or file
      assert file, f"{fault!r}: {reference!r} names no file before it"
      path = ROOT / "tests" / file
      assert path.is_file(), f"{fault!r}: {path} does not exist"
      if match.group(2):
        assert match.group(2) in _test_names(path), (
            f"{fault!r}: no test {match.group(2)} in {path}")
        named += 1
  assert named > len(rows)  # most rows name tests, not only files
