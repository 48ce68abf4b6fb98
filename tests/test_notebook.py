"""The quickstart notebook executes top to bottom in a fresh kernel (any failing cell fails the test)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("QUICKSTART_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises CellExecutionError

    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    assert "asr:" in printed and "defense_report.png" in printed, printed[-2000:]
    report = json.loads((tmp_path / "defense_report.json").read_text())
    assert report["before"]["asr"] >= 0.9 and report["after"]["asr"] <= 0.05, report["after"]
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if "image/png" in output.get("data", {})]
    assert len(images) >= 3  # the triggers, the report's bars, per-class accuracy and predictions
