"""examples/quickstart.ipynb runs top to bottom in a real Jupyter kernel
(ipykernel's "python3", the interpreter running the tests, seeing the same
moe_infinity and engine library) and shows its table and charts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

import moe_infinity

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def _tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r} expected, found {len(cells)}"
    return cells[0]


def _mimetypes(cell) -> set[str]:
    return {m for out in cell.outputs for m in out.get("data", {})}


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} has outputs: clear them before committing"


def test_quickstart_notebook_runs_in_a_kernel(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel imports the moe_infinity this test imports, with the same
    # engine library (MOE_INFINITY_LIB passes through when set).
    env = dict(os.environ)
    package_root = str(Path(moe_infinity.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    # A probe cell, added to this in-memory copy only: which Python and
    # which moe_infinity the kernel runs.
    probe = nbformat.v4.new_code_cell("import sys, moe_infinity\nprint(sys.executable)\nprint(moe_infinity.__file__)")
    nb.cells.append(probe)
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError, naming the cell, if any cell fails

    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"cell {cell.id} failed: {errors}"
        assert cell.execution_count is not None, f"cell {cell.id} did not run"

    probed = "".join(o.get("text", "") for o in probe.outputs if o.output_type == "stream").split()
    assert [os.path.realpath(p) for p in probed] == [os.path.realpath(sys.executable), os.path.realpath(moe_infinity.__file__)]

    streamed = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream" and o.name == "stdout")
    assert "def read_config(path):" in streamed, "the streamer printed the generation"

    table = _tagged(nb, "stats-table")
    assert "text/html" in _mimetypes(table)
    html = next(o["data"]["text/html"] for o in table.outputs if "text/html" in o.get("data", {}))
    assert "<table" in html and "hit rate" in html and html.count("<tr>") == 1 + 4 + 1  # header, 4 layers, total

    for tag in ("heatmap", "hit-rates"):
        assert "image/png" in _mimetypes(_tagged(nb, tag)), f"the {tag} cell drew no picture"
