"""notebooks/sparse_autoencoder.ipynb runs top to bottom in a real kernel on local:2 and shows the
learned filters and the timing plot as images (issue 6, point 4)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbrun import error_of, run_notebook, text_of

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "sparse_autoencoder.ipynb"


def tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def pngs(cell) -> list[str]:
    return [o["data"]["image/png"] for o in cell.get("outputs", [])
            if o["output_type"] in ("display_data", "execute_result") and "image/png" in o.get("data", {})]


def test_sparse_autoencoder_notebook_trains_and_shows_filters_and_timing(kernel_name):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    run_notebook(nb, kernel_name, NOTEBOOK.parent, timeout=300)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert error_of(cell) is None, f"{cell.source[:60]!r} failed:\n{text_of(cell)}"
    shown = "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    assert "cost on the cluster" in shown and "L-BFGS included" in shown
    filters, timing = tagged(nb, "filters"), tagged(nb, "timing")
    assert len(pngs(filters)) == 1, text_of(filters)
    assert len(pngs(timing)) == 1, text_of(timing)
    assert "seconds per L-BFGS function evaluation" in text_of(timing)  # measure()'s table
    assert "stopped 2 workers" in text_of(nb.cells[-1])
