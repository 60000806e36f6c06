"""The notebooks: each runs top to bottom in small mode in a fresh Jupyter kernel started from notebooks/, as a
researcher's would, and each is committed without outputs, Colab-ready and linked from the README."""

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import FAST_COMPILE_FLAGS

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
REPO_URL = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the kernel's coloured tracebacks, made plain for the test log
COLAB = "https://colab.research.google.com/github/" + REPO_URL.removeprefix("https://github.com/") + "/blob/main/"


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec for this interpreter: a user-wide `python3` spec could name another Python."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "lc_jax_test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "lc_jax", "language": "python"}))
    return root


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_small_mode(path, kernel_dir, tmp_path, monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("LC_JAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("LC_JAX_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    # One CPU device, as on a researcher's machine (conftest asks for 8); XLA's CPU backend optimisations off: the
    # cells are checked to run, not timed, and small mode is mostly compiling (37 s -> 21 s for notebook 03).
    monkeypatch.setenv("XLA_FLAGS", " ".join(["--xla_backend_optimization_level=0", *FAST_COMPILE_FLAGS]))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="lc_jax_test", timeout=300,
                                     resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # the failing cell and its traceback, not the whole log
        plain = ANSI.sub("", str(e))
        pytest.fail(f"{path.name}: {plain[-3000:]}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_and_colab_ready(path):
    cells = _cells(path)
    dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c["outputs"] or c["execution_count"])]
    assert not dirty, f"{path.name}: cells {dirty} keep outputs; clear them before committing"
    assert "widgets" not in json.loads(path.read_text())["metadata"]
    first = cells[0]
    assert first["cell_type"] == "markdown" and "?" in _source(first), "the first cell states the question"
    assert COLAB + f"notebooks/{path.name}" in _source(first), "the first cell has its Open-in-Colab badge"
    setup = next(c for c in cells if c["cell_type"] == "code")
    assert REPO_URL in _source(setup) and "google.colab" in _source(setup), "the first code cell installs on Colab"


def test_notebooks_share_one_install_cell():
    firsts = {_source(next(c for c in _cells(p) if c["cell_type"] == "code")) for p in NOTEBOOKS}
    assert len(firsts) == 1, "every notebook starts with the same install cell"


def test_readme_explore_links_every_notebook():
    readme = (ROOT / "README.md").read_text()
    explore = readme.split("## Explore", 1)[1].split("\n## ", 1)[0]
    linked = set(re.findall(re.escape(COLAB) + r"notebooks/([\w.-]+\.ipynb)", explore))
    assert linked == {p.name for p in NOTEBOOKS}
    assert len(NOTEBOOKS) == 5
