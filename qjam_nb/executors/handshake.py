"""Can this worker and the notebook exchange pickles? Compared from the worker's hello.

cloudpickle ships code objects, which only the same Python minor version can
load; cloudpickle's and numpy's pickles change between major versions. A
worker with no numpy at all is fine until a numpy array has to reach it.
"""

from __future__ import annotations

import platform

import cloudpickle


def master_versions() -> dict:
    try:
        from importlib.metadata import version

        numpy_version: str | None = version("numpy")
    except Exception:
        numpy_version = None
    return {"python": platform.python_version(), "cloudpickle": cloudpickle.__version__, "numpy": numpy_version}


def _major(v: str, parts: int = 1) -> str:
    return ".".join(v.split(".")[:parts])


def mismatch(worker: str, hello: dict, master: dict | None = None) -> str | None:
    """Why ``worker`` cannot work with this notebook, or None if it can."""
    master = master or master_versions()
    problems = []
    if _major(hello.get("python", "?"), 2) != _major(master["python"], 2):
        problems.append(f"Python {hello.get('python')} there, {master['python']} here")
    if _major(hello.get("cloudpickle", "?")) != _major(master["cloudpickle"]):
        problems.append(f"cloudpickle {hello.get('cloudpickle')} there, {master['cloudpickle']} here")
    if hello.get("numpy") and master["numpy"] and _major(hello["numpy"]) != _major(master["numpy"]):
        problems.append(f"numpy {hello['numpy']} there, {master['numpy']} here")
    if not problems:
        return None
    return (
        f"worker {worker} cannot exchange pickles with this notebook: " + "; ".join(problems)
        + ". Point --python (python=, or QJAM_REMOTE_PYTHON) at an interpreter on that host whose versions "
        "match, or install matching versions there"
    )


def describe_threads(blas: dict | None) -> str:
    """What a worker's HELLO says of its BLAS threads, in a few words: "1 (2 cores // 2 workers)"."""
    if not blas:
        return "?"
    n = blas.get("threads")
    why = {
        "share": f"{blas.get('cores')} cores // {blas.get('workers')} workers",
        "environment": "set in its environment",
        "option": "blas_threads",
        "off": "left alone",
    }.get(blas.get("source"), "")
    if n is None:
        return f"default ({why}; {blas.get('cores')} cores)" if why else "default"
    return f"{n} ({why})" if why else str(n)
