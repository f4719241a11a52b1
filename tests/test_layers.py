"""Imports point downward only (docs: DESIGN.md, "Layers").

  ui (IPython, ipywidgets)  ->  cluster (the face)  ->  executors  ->  transport  ->  worker (protocol)

Read from the source with ``ast``, so a forbidden import is caught even inside
a function or behind a branch that the test suite never runs.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qjam_nb"

#: Notebook-only packages: only qjam_nb.ui may import them. tqdm.auto and
#: tqdm.notebook are listed because they pull in ipywidgets inside a kernel.
UI_ONLY = ("IPython", "ipywidgets", "ipykernel", "qjam_nb.ui", "tqdm.notebook", "tqdm.auto", "tqdm.autonotebook")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, dotted name) for everything a module imports, relative imports made absolute.

    ``from pkg import name`` yields both ``pkg`` and ``pkg.name`` (``name`` may
    be a submodule). ``importlib.import_module("x")`` and ``__import__("x")``
    with a literal name count too.
    """
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base_parts = package.split(".")
            if not node.level:
                target = node.module or ""
            elif node.level - 1 < len(base_parts):
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:  # climbs above the top package: kept relative, so it is visible
                target = "." * node.level + (node.module or "")
            found.append((node.lineno, target))
            sep = "" if target.endswith(".") else "."
            found += [(node.lineno, f"{target}{sep}{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(files, forbidden, root: Path = PACKAGE) -> list[str]:
    """``forbidden(name) -> bool``; one line per offending import, with file and line."""
    bad = []
    for path in files:
        for line, name in imported_names(path, root):
            if forbidden(name):
                bad.append(f"{path.relative_to(root.parent)}:{line}: imports {name}")
    return sorted(set(bad))


def py_files(*relative: str, root: Path = PACKAGE) -> list[Path]:
    files: list[Path] = []
    for rel in relative:
        target = root / rel
        assert target.exists(), f"{target} is gone: update tests/test_layers.py"
        files += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return files


ENGINE = ("cluster", "executors", "transport", "worker", "dataset.py", "errors.py", "events.py", "states.py")


def test_the_layers_exist():
    for rel in ENGINE:
        assert py_files(rel), f"no Python files in qjam_nb/{rel}"
    # the checker reads real imports: the face uses the executors, which use the transport and the protocol
    cluster_imports = {n for f in py_files("cluster") for _, n in imported_names(f)}
    assert "qjam_nb.executors.base" in cluster_imports
    executor_imports = {n for f in py_files("executors") for _, n in imported_names(f)}
    assert "qjam_nb.worker.protocol" in executor_imports
    assert any(under(n, "qjam_nb.transport") for n in executor_imports)


def face_below_the_seam(name: str) -> bool:
    """``cluster/`` and ``ui/`` know no frame, link or worker module: a Dask executor needs none of them.
    Of the transport they may name the registry (``SshOptions``, the ``local`` host entry) only."""
    return under(name, "qjam_nb.worker") or (  # (the package itself is named by every "from ..transport import x")
        under(name, "qjam_nb.transport") and name != "qjam_nb.transport"
        and not under(name, "qjam_nb.transport.registry"))


def executor_above_itself(name: str) -> bool:
    return under(name, "qjam_nb.cluster") or under(name, "qjam_nb.ui")


def test_the_face_reaches_workers_only_through_an_executor():
    bad = violations(py_files("cluster", "ui"), face_below_the_seam)
    assert bad == [], "the face hands calls to an executor (qjam_nb.executors):\n" + "\n".join(bad)


def test_executors_never_import_the_face_and_transports_never_import_executors():
    bad = violations(py_files("executors"), executor_above_itself)
    bad += violations(py_files("transport"), lambda n: under(n, "qjam_nb.executors"))
    assert bad == [], "imports point down: cluster -> executors -> transport:\n" + "\n".join(bad)


def test_engine_never_imports_the_notebook_ui():
    bad = violations(py_files(*ENGINE), lambda n: any(under(n, p) for p in UI_ONLY))
    assert bad == [], "only qjam_nb.ui may import notebook packages:\n" + "\n".join(bad)


def test_transport_never_imports_the_cluster():
    bad = violations(py_files("transport"), lambda n: under(n, "qjam_nb.cluster"))
    assert bad == [], "the transport layer sits below the cluster:\n" + "\n".join(bad)


def test_worker_imports_nothing_of_the_master():
    def foreign(name: str) -> bool:
        return name.startswith(".") or (under(name, "qjam_nb") and not under(name, "qjam_nb.worker"))

    bad = violations(py_files("worker"), foreign)
    assert bad == [], "the worker travels alone; it may import only itself:\n" + "\n".join(bad)


#: What the worker package may import besides itself: it travels to hosts that have a Python and cloudpickle.
WORKER_MAY_IMPORT = ("cloudpickle", "__future__")


def outside_the_worker(name: str) -> bool:
    """True if a worker module importing ``name`` needs something a bare host lacks (or the master)."""
    if name.startswith("."):  # climbs above the top package
        return True
    top = name.split(".")[0]
    if top == "qjam_nb":
        return not under(name, "qjam_nb.worker")
    return top not in sys.stdlib_module_names and top not in WORKER_MAY_IMPORT


def test_worker_imports_only_itself_the_standard_library_and_cloudpickle():
    bad = violations(py_files("worker"), outside_the_worker)
    assert bad == [], ("qjam_nb/worker/ travels to bare hosts: it may import itself, the standard library and "
                       "cloudpickle only:\n" + "\n".join(bad))


def test_checker_flags_a_worker_importing_a_third_party_package(tmp_path):
    root = tmp_path / "qjam_nb"
    files = {
        "__init__.py": "",
        "worker/__init__.py": "",
        "worker/ok.py": ("from __future__ import annotations\nimport os, ctypes\nimport cloudpickle\n"
                         "from . import protocol\nfrom .protocol import Kind\nimport importlib.util\n"),
        "worker/bad.py": ("import numpy as np\ndef f():\n    import xxhash\n    from ..cluster import pool\n"
                          "    import importlib\n    return importlib.import_module('paramiko')\n"),
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert violations(py_files("worker", root=root), outside_the_worker, root) == [
        "qjam_nb/worker/bad.py:1: imports numpy",
        "qjam_nb/worker/bad.py:3: imports xxhash",
        "qjam_nb/worker/bad.py:4: imports qjam_nb.cluster",
        "qjam_nb/worker/bad.py:4: imports qjam_nb.cluster.pool",
        "qjam_nb/worker/bad.py:6: imports paramiko",
    ]


def test_plain_import_loads_no_notebook_package():
    # the same rule at run time, where third-party imports count too
    code = (
        "import sys, qjam_nb, qjam_nb.cluster.cluster, qjam_nb.transport.local, qjam_nb.dataset;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('IPython', 'ipywidgets', 'ipykernel')"
        " or m.startswith('qjam_nb.ui')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


# -- the checker itself ------------------------------------------------------------


@pytest.fixture
def fake_package(tmp_path):
    root = tmp_path / "qjam_nb"
    files = {
        "__init__.py": "",
        "errors.py": "class E(Exception): pass\n",
        "cluster/__init__.py": "from . import core\n",
        "cluster/core.py": (
            "import os\nfrom ..transport import local\nfrom .. import ui\n"
            "def later():\n    import IPython.display\n"
            "    import importlib\n    importlib.import_module('ipywidgets')\n"
        ),
        "transport/__init__.py": "from ..cluster.core import later\n",
        "transport/local.py": "from qjam_nb import cluster as c\nfrom ..worker import protocol\n",
        "worker/__init__.py": "",
        "worker/protocol.py": "import struct\nfrom . import protocol\n",
        "worker/main.py": "from . import protocol\nfrom ..errors import E\nfrom ... import nothing\n",
        "ui/__init__.py": "import ipywidgets\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_checker_resolves_relative_and_dynamic_imports(fake_package):
    names = [n for _, n in imported_names(fake_package / "cluster" / "core.py", fake_package)]
    assert sorted(names) == sorted([
        "os", "qjam_nb.transport", "qjam_nb.transport.local", "qjam_nb", "qjam_nb.ui",
        "IPython.display", "importlib", "ipywidgets",
    ])
    init = [n for _, n in imported_names(fake_package / "cluster" / "__init__.py", fake_package)]
    assert init == ["qjam_nb.cluster", "qjam_nb.cluster.core"]


def test_checker_flags_every_planted_violation(fake_package):
    files = py_files("cluster", "transport", "worker", "errors.py", root=fake_package)
    ui = violations(files, lambda n: any(under(n, p) for p in UI_ONLY), fake_package)
    assert ui == [
        "qjam_nb/cluster/core.py:3: imports qjam_nb.ui",
        "qjam_nb/cluster/core.py:5: imports IPython.display",
        "qjam_nb/cluster/core.py:7: imports ipywidgets",
    ]
    down = violations(py_files("transport", root=fake_package), lambda n: under(n, "qjam_nb.cluster"), fake_package)
    assert down == [
        "qjam_nb/transport/__init__.py:1: imports qjam_nb.cluster.core",
        "qjam_nb/transport/__init__.py:1: imports qjam_nb.cluster.core.later",
        "qjam_nb/transport/local.py:1: imports qjam_nb.cluster",
    ]
    worker = violations(
        py_files("worker", root=fake_package),
        lambda n: n.startswith(".") or (under(n, "qjam_nb") and not under(n, "qjam_nb.worker")),
        fake_package,
    )
    assert worker == [
        "qjam_nb/worker/main.py:2: imports qjam_nb.errors",
        "qjam_nb/worker/main.py:2: imports qjam_nb.errors.E",
        "qjam_nb/worker/main.py:3: imports ...",
        "qjam_nb/worker/main.py:3: imports ...nothing",
    ]


# -- the transport's doors: what the layers above may know of it ------------------------------------------

#: The transport modules the layers above may import: the registry opens hosts, ``link`` frames a worker's
#: stream, ``base`` says what a transport is. Every transport itself (local, forked, ssh, ...) stays behind them.
TRANSPORT_DOORS = ("qjam_nb.transport", "qjam_nb.transport.registry", "qjam_nb.transport.link",
                   "qjam_nb.transport.base")
#: Classes of particular transports, which code above the transport must not name.
TRANSPORT_CLASSES = ("SshTransport", "LocalTransport", "SshProcess", "LocalProcess", "ForkedProcess", "ForkServer")
#: Above the transport: the executors, the cluster, the notebook UI, and the package's own top-level modules.
ABOVE_TRANSPORT = ("executors", "cluster", "ui")


def above_transport(root: Path = PACKAGE) -> list[Path]:
    return py_files(*ABOVE_TRANSPORT, root=root) + sorted(root.glob("*.py"))


def behind_the_doors(name: str) -> bool:
    if not under(name, "qjam_nb.transport"):
        return False
    # a door, or a name imported from a door module (not from the package: there it is a module)
    return name not in TRANSPORT_DOORS and name.rpartition(".")[0] not in TRANSPORT_DOORS[1:]


def named_transports(files, root: Path = PACKAGE) -> list[str]:
    """One line per mention (a name, an attribute, an imported name) of a particular transport's class."""
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.ImportFrom):
                names = [alias.name for alias in node.names]
            for name in names:
                if name in TRANSPORT_CLASSES:
                    bad.append(f"{path.relative_to(root.parent)}:{node.lineno}: names {name}")
    return sorted(set(bad))


def reaches_into_process(files, root: Path = PACKAGE) -> list[str]:
    """One line per ``x.process`` (a link's worker process) in ``files``: the link's own verbs are the door."""
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "process":
                bad.append(f"{path.relative_to(root.parent)}:{node.lineno}: reaches into {ast.unparse(node)}")
    return sorted(set(bad))


def test_the_cluster_opens_hosts_through_the_registry_only():
    bad = violations(above_transport(), behind_the_doors)
    bad += named_transports(above_transport())
    assert bad == [], ("above the transport, hosts are opened through transport.registry (open_host) and "
                       "workers reached through their Link; no transport is named:\n" + "\n".join(bad))


def test_nothing_above_the_transport_reaches_into_a_link_process():
    bad = reaches_into_process(above_transport())
    assert bad == [], ("use the Link's verbs (kill, interrupt, exit_status, cpu_state, wait, free, drop, "
                       "shares_memory, learn_pid), not its process:\n" + "\n".join(bad))


def test_checker_flags_transports_named_and_processes_reached(tmp_path):
    root = tmp_path / "qjam_nb"
    files = {
        "__init__.py": "from .transport.registry import SshOptions\n",
        "cluster/__init__.py": "",
        "cluster/good.py": ("from ..transport.link import Link, LinkClosed\nfrom ..transport import registry\n"
                            "from ..transport.registry import open_host\ndef f(link):\n    link.kill()\n"),
        "cluster/bad.py": ("from ..transport.ssh import SshOptions\nfrom ..transport import local\n"
                           "from ..transport.registry import LocalTransport\nimport qjam_nb.transport.forked\n"
                           "def f(link, m):\n    link.process.kill()\n    return m.SshTransport\n"),
        "ui/__init__.py": "def g(w):\n    return w.link.process.pid\n",
        "executors/__init__.py": "from ..cluster import good\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    files = above_transport(root)
    assert violations(py_files("cluster", "ui", root=root), face_below_the_seam, root) == [
        "qjam_nb/cluster/bad.py:1: imports qjam_nb.transport.ssh",
        "qjam_nb/cluster/bad.py:1: imports qjam_nb.transport.ssh.SshOptions",
        "qjam_nb/cluster/bad.py:2: imports qjam_nb.transport.local",
        "qjam_nb/cluster/bad.py:4: imports qjam_nb.transport.forked",
        "qjam_nb/cluster/good.py:1: imports qjam_nb.transport.link",
        "qjam_nb/cluster/good.py:1: imports qjam_nb.transport.link.Link",
        "qjam_nb/cluster/good.py:1: imports qjam_nb.transport.link.LinkClosed",
    ]
    assert violations(py_files("executors", root=root), executor_above_itself, root) == [
        "qjam_nb/executors/__init__.py:1: imports qjam_nb.cluster",
        "qjam_nb/executors/__init__.py:1: imports qjam_nb.cluster.good",
    ]
    assert violations(files, behind_the_doors, root) == [
        "qjam_nb/cluster/bad.py:1: imports qjam_nb.transport.ssh",
        "qjam_nb/cluster/bad.py:1: imports qjam_nb.transport.ssh.SshOptions",
        "qjam_nb/cluster/bad.py:2: imports qjam_nb.transport.local",
        "qjam_nb/cluster/bad.py:4: imports qjam_nb.transport.forked",
    ]
    assert named_transports(files, root) == [
        "qjam_nb/cluster/bad.py:3: names LocalTransport",
        "qjam_nb/cluster/bad.py:7: names SshTransport",
    ]
    assert reaches_into_process(files, root) == [
        "qjam_nb/cluster/bad.py:6: reaches into link.process",
        "qjam_nb/ui/__init__.py:2: reaches into w.link.process",
    ]
