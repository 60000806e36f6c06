"""Execute every notebook's code cells in small mode (no Jupyter kernel needed)."""

import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOKS = sorted(Path(__file__).parent.parent.glob("notebooks/*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.setenv("LC_JAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("LC_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.chdir(path.parent.parent)
    namespace: dict = {}
    for i, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] == "code":
            code = "".join(cell["source"])
            exec(compile(code, f"{path.name}[cell {i}]", "exec"), namespace)
