"""notebooks/inspect_checkpoint.ipynb runs top to bottom on a fresh tiny
checkpoint."""

import os
from pathlib import Path

import nbclient
import nbformat

from tests import tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "inspect_checkpoint.ipynb"


def test_notebook_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch):
  tiny_checkpoint.write(str(tmp_path / "model"), num_steps=2)
  monkeypatch.setenv("MOE_JAX_CHECKPOINT", str(tmp_path / "model"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # Raises CellExecutionError naming the cell if any cell fails.
  nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                          resources={"metadata": {"path": str(REPO)}}
                          ).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code"
             for o in cell.outputs]
  assert any(o.get("output_type") == "display_data" and
             "image/png" in o.get("data", {}) for o in outputs)
