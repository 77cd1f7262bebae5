"""The SAM demo notebook runs end to end (every cell; its own asserts check that adapting helps) and is committed
without outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "demo" / "sam_adaptation.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "the notebook has no code"
    for cell in code:
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, "strip the notebook's outputs"


def test_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DEMO_OUT", str(tmp_path / "out"))
    monkeypatch.delenv("SAM_CHECKPOINT", raising=False)  # the offline story (embedded SAM)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stdout"
    )
    assert "before adapting" in text and "after" in text
    for png in ("before.png", "after.png", "loss.png", "merged.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000, png
