"""Every notebook runs top to bottom in a fresh kernel on a tiny model and shows plotly figures."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
_spec = importlib.util.spec_from_file_location("workbench_notebooks_build", NOTEBOOKS / "build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"


def test_notebooks_match_the_build_script(tmp_path):
    """The committed notebooks are what ``notebooks/build.py`` writes, without outputs."""
    build.main([str(tmp_path)])
    for name in build.NOTEBOOKS:
        committed = NOTEBOOKS / name
        assert committed.exists(), f"{name} missing; run python notebooks/build.py"
        assert committed.read_text() == (tmp_path / name).read_text(), f"{name} is stale; run notebooks/build.py"
        nb = nbformat.read(committed, as_version=4)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
        assert committed.stat().st_size < 3_000_000
        # the idea first: a few markdown cells before the first code cell
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


def _mime_types(nb) -> list[str]:
    kinds = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            kinds.extend(out.get("data", {}).keys())
    return kinds


@pytest.mark.parametrize("name", list(build.NOTEBOOKS))
def test_notebook_runs(name, tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_FAST", "1")
    monkeypatch.setenv("WORKBENCH_NOTEBOOK_MODEL", tiny_checkpoints["llama"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()   # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    kinds = _mime_types(nb)
    assert PLOTLY in kinds, f"no plotly figure in the outputs of {name}"
    assert WIDGET in kinds, f"no widget in the outputs of {name}"
    # every figure output is a real figure with traces
    figures = [o["data"][PLOTLY] for c in nb.cells for o in c.get("outputs", []) if PLOTLY in o.get("data", {})]
    figures = [json.loads(f) if isinstance(f, str) else f for f in figures]
    assert all(f.get("data") for f in figures)
    if name in REPORTS:       # the notebook's HTML report, written beside it: three runs and the spectra
        page = (tmp_path / REPORTS[name]).read_text()
        assert page.count('class="plotly-graph-div"') == 12 and "<td>TurboBoA</td>" in page


REPORTS = {"02_gptq_boa_turboboa.ipynb": "gptq-boa-turboboa-report.html"}
