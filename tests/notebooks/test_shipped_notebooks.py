"""Every notebook in notebooks/ runs top to bottom in a real kernel without an error.

The numbered teaching notebooks (01_...ipynb to 05_...ipynb) are run, and their
results checked, by test_teaching_notebooks.py; this file runs the others.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbrun import error_of, run_notebook, text_of

NOTEBOOKS = sorted(p for p in (Path(__file__).parents[2] / "notebooks").glob("*.ipynb") if not p.name[0].isdigit())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, kernel_name):
    nb = nbformat.read(path, as_version=4)
    run_notebook(nb, kernel_name, path.parent)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert error_of(cell) is None, f"{path.name}: {cell.source[:60]!r} failed:\n{text_of(cell)}"

