"""Every notebook in notebooks/ runs top to bottom in a real kernel without an error."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbrun import error_of, run_notebook, text_of

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, kernel_name):
    nb = nbformat.read(path, as_version=4)
    run_notebook(nb, kernel_name, path.parent)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert error_of(cell) is None, f"{path.name}: {cell.source[:60]!r} failed:\n{text_of(cell)}"


def test_newton_notebook_converges_and_second_matrix_call_is_cached(kernel_name):
    path = Path(__file__).parents[2] / "notebooks" / "newton.ipynb"
    nb = nbformat.read(path, as_version=4)
    run_notebook(nb, kernel_name, path.parent)
    shown = "\n".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    assert "11111.11106055" in shown
    assert "matrix sum" in shown
