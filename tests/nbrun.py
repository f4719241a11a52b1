"""Helpers to build, run and read notebooks in tests."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient


class CountingClient(NotebookClient):
    """Counts widget model updates the kernel sent while each cell ran."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.updates: dict[int, int] = {}

    def handle_comm_msg(self, outs, msg, cell_index):
        data = msg["content"].get("data", {})
        if msg["msg_type"] == "comm_msg" and data.get("method") == "update":
            self.updates[cell_index] = self.updates.get(cell_index, 0) + 1
        return super().handle_comm_msg(outs, msg, cell_index)


def run_notebook(nb, kernel_name: str, cwd, timeout: int = 120) -> CountingClient:
    client = CountingClient(
        nb, kernel_name=kernel_name, timeout=timeout, allow_errors=True,
        store_widget_state=True, resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()
    return client


def new_notebook(*sources: str):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    return nb


def text_of(cell) -> str:
    """Everything a cell showed: streams, results, error tracebacks."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", ""))
        elif out["output_type"] == "error":
            parts.append(out["ename"] + ": " + out["evalue"])
            parts.extend(out["traceback"])
    return "\n".join(parts)


def error_of(cell):
    return next((o for o in cell.get("outputs", []) if o["output_type"] == "error"), None)
