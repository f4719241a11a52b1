"""The travelling worker runs in a bare interpreter: stdlib plus the cloudpickle we ship.

The worker package and cloudpickle are copied to a temporary directory and
started with ``python -I -S`` (no site-packages: no numpy, no qjam_nb), exactly
the way the master bootstraps it; the test then speaks the protocol to it over
its stdin/stdout, as the master does.
"""

from __future__ import annotations

import ast
import os
import pickle
import platform
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

from qjam_nb.transport.base import bootstrap_code
from qjam_nb.worker import protocol, sharedmem
from qjam_nb.worker.protocol import FrameDecoder, Kind

WORKER_SOURCES = Path(protocol.__file__).resolve().parent
TIMEOUT = 10.0
CELL = "<qjam-test-cell>"


def by_value(source: str) -> dict:
    """Functions defined in a module that does not exist, so cloudpickle ships them by value."""
    namespace = {"__name__": "qjam_test_cell"}
    exec(compile(source, CELL, "exec"), namespace)
    return namespace


SOURCE = '''
import os
import sys
import time

def total(params, data):
    return params["scale"] * sum(data)

def chatty(params, data):
    print("hello from print", len(data))
    os.write(1, b"raw bytes on fd 1\\n")
    print("to stderr", file=sys.stderr)
    return "done"

def boom(params, data):
    raise ValueError("mapfunc exploded on " + repr(data))

def environment(params, data):
    import importlib.util
    return {
        "isolated": sys.flags.isolated,
        "no_site": sys.flags.no_site,
        "numpy_importable": importlib.util.find_spec("numpy") is not None,
        "qjam_nb_importable": importlib.util.find_spec("qjam_nb") is not None,
        "site_packages": [p for p in sys.path if "site-packages" in p],
        "data": data,
    }

def slow(params, data):
    time.sleep(data[0])
    return data[0]
'''
FUNCS = by_value(SOURCE)
RAISE_LINE = SOURCE.splitlines().index('    raise ValueError("mapfunc exploded on " + repr(data))') + 1


class BareWorker:
    """A worker process started bare, and the master's side of its stream."""

    def __init__(self, tmp_path: Path, name: str = "bare/0") -> None:
        pkg = tmp_path / "pkg"
        deps = tmp_path / "deps"
        pkg.mkdir()
        for source in WORKER_SOURCES.glob("*.py"):
            shutil.copy(source, pkg / source.name)
        shutil.copytree(
            Path(cloudpickle.__file__).resolve().parent, deps / "cloudpickle",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        code = f"import sys;sys.path.insert(0, {str(deps)!r});" + bootstrap_code(str(pkg), name)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QJAM_", "PYTHON"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", code],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            bufsize=0, cwd=tmp_path, env=env,
        )
        self.frames: queue.Queue = queue.Queue()
        self.stream_error: Exception | None = None
        self.stderr = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._errreader = threading.Thread(target=self._read_stderr, daemon=True)
        self._errreader.start()

    def _read(self) -> None:
        decoder = FrameDecoder()
        fd = self.proc.stdout.fileno()
        try:
            while data := os.read(fd, 65536):
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    self.frames.put(frame)
            decoder.eof()
        except Exception as exc:  # the test asserts on it
            self.stream_error = exc
        finally:
            self.frames.put(None)

    def _read_stderr(self) -> None:
        while data := os.read(self.proc.stderr.fileno(), 65536):
            self.stderr += data

    def send(self, kind: Kind, body=None, call: int = 0, index: int = -1) -> None:
        self.proc.stdin.write(protocol.frame_bytes(protocol.encode(kind, body, call=call, index=index)))
        self.proc.stdin.flush()

    def call(self, call: int, func, params=None) -> None:
        body = {
            "func": pickle.PickleBuffer(cloudpickle.dumps(func, protocol=5)),
            "params": (pickle.PickleBuffer(cloudpickle.dumps(params, protocol=5)), []),
            "sources": {},
        }
        self.send(Kind.CALL, body, call=call)

    def next(self, timeout: float = TIMEOUT) -> protocol.Frame:
        try:
            frame = self.frames.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no frame from the worker within {timeout}s; stderr: {self.stderr!r}")
        if frame is None:
            pytest.fail(
                f"the worker's stream ended (exit {self.proc.poll()}, stream error {self.stream_error!r}); "
                f"stderr: {self.stderr!r}"
            )
        return frame

    def until(self, kind: Kind, timeout: float = TIMEOUT) -> tuple[protocol.Frame, list]:
        """Frames up to the first of ``kind``: (that frame, the frames before it)."""
        before = []
        deadline = time.monotonic() + timeout
        while True:
            frame = self.next(max(0.1, deadline - time.monotonic()))
            if frame.kind is kind:
                return frame, before
            before.append(frame)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


@pytest.fixture
def worker(tmp_path):
    w = BareWorker(tmp_path)
    hello = w.next()
    assert hello.kind is Kind.HELLO, hello
    w.hello = hello.body()
    yield w
    w.stop()


def test_hello_names_the_worker_and_its_versions(worker):
    hello = worker.hello
    assert hello["worker"] == "bare/0"
    assert hello["pid"] == worker.proc.pid
    assert hello["python"] == platform.python_version()
    assert hello["cloudpickle"] == cloudpickle.__version__
    assert hello["numpy"] is None  # installed here, but not visible to a bare interpreter
    assert hello["protocol"] == protocol.PROTOCOL_VERSION


def test_the_interpreter_really_is_bare(worker):
    worker.call(1, FUNCS["environment"])
    worker.send(Kind.TASK, {"key": None}, call=1, index=0)
    result, _ = worker.until(Kind.RESULT)
    env = result.body()["value"]
    assert env["isolated"] == 1 and env["no_site"] == 1
    assert not env["numpy_importable"]
    assert not env["qjam_nb_importable"]
    assert env["site_packages"] == []
    assert env["data"] == []  # a TASK without a key runs on an empty slice


def test_call_data_task_gives_the_result_and_a_short_slice_no_started(worker):
    worker.call(1, FUNCS["total"], {"scale": 10})
    worker.send(Kind.DATA, {"key": "k", "data": [1, 2, 3]}, call=1, index=0)
    worker.send(Kind.TASK, {"key": "k"}, call=1, index=0)
    result = worker.next()
    assert (result.kind, result.call, result.index) == (Kind.RESULT, 1, 0)
    body = result.body()
    assert body["value"] == 60
    assert body["seconds"] >= 0

    # the slice stays cached: a second TASK needs no DATA, and a new call reuses it
    worker.send(Kind.TASK, {"key": "k"}, call=1, index=1)
    assert worker.until(Kind.RESULT)[0].body()["value"] == 60
    worker.call(2, FUNCS["total"], {"scale": -1})
    worker.send(Kind.TASK, {"key": "k"}, call=2, index=0)
    result, before = worker.until(Kind.RESULT)
    assert result.call == 2 and result.body()["value"] == -6
    assert before == []


def test_data_carrying_its_task_caches_the_slice_and_runs_it(worker):
    worker.call(1, FUNCS["total"], {"scale": 2})
    worker.send(Kind.DATA, {"key": "k", "data": [1, 2], "task": {"key": "k"}}, call=1, index=3)
    result = worker.next()
    assert (result.kind, result.call, result.index, result.body()["value"]) == (Kind.RESULT, 1, 3, 6)
    worker.send(Kind.TASK, {"key": "k"}, call=1, index=4)  # cached: no NEED
    result = worker.next()
    assert (result.kind, result.index, result.body()["value"]) == (Kind.RESULT, 4, 6)
    worker.send(Kind.DATA, {"key": "j", "data": [5]}, call=1, index=5)  # without a task: only cached
    worker.send(Kind.TASK, {"key": "j"}, call=1, index=5)
    result = worker.next()
    assert (result.kind, result.index, result.body()["value"]) == (Kind.RESULT, 5, 10)


def test_a_slice_running_3_ms_says_started_then_its_result(worker):
    worker.call(1, FUNCS["slow"])
    worker.send(Kind.DATA, {"key": "k", "data": [0.05]}, call=1, index=4)
    worker.send(Kind.TASK, {"key": "k"}, call=1, index=4)
    started = worker.next()
    assert (started.kind, started.call, started.index) == (Kind.STARTED, 1, 4)
    result = worker.next()
    assert (result.kind, result.call, result.index) == (Kind.RESULT, 1, 4)
    assert result.body()["seconds"] >= 0.05


def test_task_for_an_uncached_slice_gets_need(worker):
    worker.call(1, FUNCS["total"], {"scale": 1})
    worker.send(Kind.TASK, {"key": "missing"}, call=1, index=5)
    need = worker.next()
    assert (need.kind, need.call, need.index) == (Kind.NEED, 1, 5)
    assert need.body() == {"key": "missing"}
    # once the slice is sent, the same task runs
    worker.send(Kind.DATA, {"key": "missing", "data": [4]}, call=1, index=5)
    worker.send(Kind.TASK, {"key": "missing"}, call=1, index=5)
    result, _ = worker.until(Kind.RESULT)
    assert result.index == 5 and result.body()["value"] == 4


def test_tasks_in_one_frame_run_in_order_each_answering_for_its_slice(worker):
    worker.call(1, FUNCS["total"], {"scale": 1})
    worker.send(Kind.DATA, {"key": "a", "data": [1]}, call=1, index=0)
    worker.send(Kind.DATA, {"key": "b", "data": [2]}, call=1, index=1)
    worker.send(Kind.TASKS, [(7, "b"), (3, "missing"), (5, "a")], call=1, index=7)
    answers = [worker.next() for _ in range(3)]
    assert [(f.kind, f.call, f.index) for f in answers] == [(Kind.RESULT, 1, 7), (Kind.NEED, 1, 3), (Kind.RESULT, 1, 5)]
    assert answers[0].body()["value"] == 2 and answers[1].body() == {"key": "missing"}
    assert answers[2].body()["value"] == 1
    # an entry may bring its slice: cached first, then run, and still cached for the next task
    worker.send(Kind.TASKS, [(8, "c", [5, 6]), (9, "a")], call=1, index=8)
    answers = [worker.next() for _ in range(2)]
    assert [(f.kind, f.index, f.body()["value"]) for f in answers] == [(Kind.RESULT, 8, 11), (Kind.RESULT, 9, 1)]
    worker.send(Kind.TASK, {"key": "c"}, call=1, index=10)
    assert worker.until(Kind.RESULT)[0].body()["value"] == 11


def test_drop_forgets_a_cached_slice(worker):
    worker.call(1, FUNCS["total"], {"scale": 1})
    worker.send(Kind.DATA, {"key": "a", "data": [1]}, call=1, index=0)
    worker.send(Kind.DROP, {"keys": ["a"]}, call=1)
    worker.send(Kind.TASK, {"key": "a"}, call=1, index=0)
    need = worker.next()
    assert need.kind is Kind.NEED and need.body() == {"key": "a"}


def test_output_travels_as_stream_messages_before_the_result(worker):
    worker.call(3, FUNCS["chatty"])
    worker.send(Kind.DATA, {"key": "k", "data": [1, 2]}, call=3, index=7)
    worker.send(Kind.TASK, {"key": "k"}, call=3, index=7)
    result, before = worker.until(Kind.RESULT)
    assert result.body()["value"] == "done"
    streams = [f for f in before if f.kind is Kind.STREAM]
    assert all((f.call, f.index) == (3, 7) for f in streams)
    text = {"stdout": "", "stderr": ""}
    for f in streams:
        body = f.body()
        text[body["stream"]] += body["text"]
    assert "hello from print 2\n" in text["stdout"]
    assert "raw bytes on fd 1\n" in text["stdout"]
    assert "to stderr\n" in text["stderr"]
    assert [f.kind for f in before if f.kind is not Kind.STREAM] in ([], [Kind.STARTED])  # STARTED only if 3 ms

    # the stream is still sound afterwards: the next task decodes normally
    worker.call(4, FUNCS["total"], {"scale": 2})
    worker.send(Kind.TASK, {"key": "k"}, call=4, index=0)
    result, _ = worker.until(Kind.RESULT)
    assert result.body()["value"] == 6
    assert worker.stream_error is None


def test_mapfunc_exception_becomes_error_with_traceback(worker):
    worker.call(1, FUNCS["boom"])
    worker.send(Kind.DATA, {"key": "k", "data": [9]}, call=1, index=2)
    worker.send(Kind.TASK, {"key": "k"}, call=1, index=2)
    error, before = worker.until(Kind.ERROR)
    assert before == []  # it failed at once: no STARTED
    assert (error.call, error.index) == (1, 2)
    body = error.body()
    assert body["type"] == "ValueError"
    assert body["message"] == "mapfunc exploded on [9]"
    assert "Traceback" in body["traceback"]
    # cloudpickle renames the file to <dynamic-code>; the line and function survive
    assert f"line {RAISE_LINE}, in boom" in body["traceback"]
    assert "ValueError: mapfunc exploded on [9]" in body["traceback"]
    assert "mapfunc" in body["where"]

    # the worker stays usable
    worker.call(2, FUNCS["total"], {"scale": 1})
    worker.send(Kind.TASK, {"key": "k"}, call=2, index=0)
    result, _ = worker.until(Kind.RESULT)
    assert result.body()["value"] == 9


def test_unloadable_call_reports_error_and_skips_its_tasks(worker):
    body = {"func": pickle.PickleBuffer(b"not a pickle"), "params": (pickle.PickleBuffer(pickle.dumps(None)), [])}
    worker.send(Kind.CALL, body, call=1)
    error = worker.next()
    assert error.kind is Kind.ERROR and error.call == 1
    assert "loading" in error.body()["where"]
    worker.send(Kind.TASK, {"key": None}, call=1, index=0)
    # the failed call's task is skipped; a good call afterwards runs
    worker.call(2, FUNCS["total"], {"scale": 1})
    worker.send(Kind.DATA, {"key": "k", "data": [5]}, call=2, index=0)
    worker.send(Kind.TASK, {"key": "k"}, call=2, index=0)
    result, before = worker.until(Kind.RESULT)
    assert result.call == 2 and result.body()["value"] == 5
    assert all(f.call == 2 for f in before)


def arena_call(worker, call: int, payload: bytes, path_override: str | None = None):
    """A CALL whose params' buffer lies in a params arena, as the master sends local workers."""
    buffers: list = []
    data = pickle.dumps(pickle.PickleBuffer(payload), protocol=5, buffer_callback=buffers.append)
    arena = sharedmem.Arena(len(payload), "qjam-params-test-")
    handle = arena.write([b.raw() for b in buffers])
    if path_override:
        handle["path"] = path_override
    func = by_value("def head(params, data):\n    return bytes(params[:5]), len(params)\n")["head"]
    body = {"func": pickle.PickleBuffer(cloudpickle.dumps(func, protocol=5)),
            "params": (pickle.PickleBuffer(data), []), "params_arena": handle, "share": True}
    worker.send(Kind.CALL, body, call=call)
    return arena


@pytest.mark.skipif(not sharedmem.ARENAS, reason="no /dev/shm here")
def test_params_from_the_masters_arena_are_the_workers_own_copy(worker):
    arena = arena_call(worker, 1, b"hello" + bytes(1 << 20))
    try:
        worker.send(Kind.TASK, {"key": None}, call=1, index=0)
        result, _ = worker.until(Kind.RESULT)
        assert result.body()["value"] == (b"hello", 5 + (1 << 20))
        arena.write([memoryview(b"HELLO")])  # the next call's params, written over: the worker copied its own
    finally:
        arena.close()


@pytest.mark.skipif(not sharedmem.ARENAS, reason="no /dev/shm here")
def test_a_call_whose_params_arena_is_gone_is_over_quietly(worker):
    arena_call(worker, 1, bytes(1 << 20), path_override="/dev/shm/qjam-params-test-gone").close()
    worker.send(Kind.TASK, {"key": None}, call=1, index=0)  # skipped: that call has ended for the master
    worker.call(2, FUNCS["total"], {"scale": 1})
    worker.send(Kind.DATA, {"key": "k", "data": [5]}, call=2, index=0)
    worker.send(Kind.TASK, {"key": "k"}, call=2, index=0)
    result, before = worker.until(Kind.RESULT)
    assert result.call == 2 and result.body()["value"] == 5
    assert [f for f in before if f.call == 1] == []  # no ERROR for the ended call


def test_cancel_drops_queued_tasks_of_the_call(worker):
    worker.call(1, FUNCS["slow"])
    worker.send(Kind.DATA, {"key": "slow", "data": [0.5]}, call=1, index=0)
    worker.send(Kind.DATA, {"key": "fast", "data": [0]}, call=1, index=1)
    worker.send(Kind.TASK, {"key": "slow"}, call=1, index=0)
    worker.send(Kind.TASK, {"key": "fast"}, call=1, index=1)
    first, _ = worker.until(Kind.STARTED)
    assert first.index == 0
    worker.send(Kind.CANCEL, None, call=1)  # while slice 0 runs (0.5 s) and slice 1 waits
    worker.call(2, FUNCS["slow"])
    worker.send(Kind.TASK, {"key": "fast"}, call=2, index=0)
    result, before = worker.until(Kind.RESULT)
    if result.call == 1:  # the running slice may still report; the queued one may not
        assert result.index == 0
        result, more = worker.until(Kind.RESULT)
        before += more
    assert (result.call, result.index) == (2, 0)
    assert not [f for f in before if f.call == 1 and f.index == 1], before


def test_closing_stdin_makes_the_worker_exit(worker):
    worker.proc.stdin.close()
    assert worker.proc.wait(timeout=5) == 0
    assert worker.frames.get(timeout=5) is None  # the stream ended at a frame boundary
    assert worker.stream_error is None


def test_bye_makes_the_worker_exit(worker):
    worker.send(Kind.BYE)
    assert worker.proc.wait(timeout=5) == 0


def test_garbage_on_stdin_ends_the_worker_with_a_message(worker):
    worker.proc.stdin.write(b"this is no frame at all, just a stray shell line\n")
    worker.proc.stdin.flush()
    status = worker.proc.wait(timeout=5)
    assert status != 0
    worker._errreader.join(timeout=5)
    assert b"bare/0" in worker.stderr and b"magic" in worker.stderr


# -- what the worker package imports -------------------------------------------


def imports_of(path: Path) -> list[tuple[int, int, str]]:
    """(line, level, module) for every import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, 0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.level, node.module or ""))
    return found


def foreign_imports(path: Path) -> list[str]:
    bad = []
    for line, level, module in imports_of(path):
        top = module.partition(".")[0]
        if level > 1:
            bad.append(f"{path.name}:{line}: relative import outside the package ({'.' * level}{module})")
        elif level == 0 and top not in sys.stdlib_module_names and top != "cloudpickle":
            bad.append(f"{path.name}:{line}: import {module}")
    return bad


def test_worker_package_imports_only_stdlib_cloudpickle_and_itself():
    files = sorted(WORKER_SOURCES.glob("*.py"))
    assert {"main.py", "protocol.py", "__init__.py"} <= {f.name for f in files}
    bad = [problem for f in files for problem in foreign_imports(f)]
    assert bad == [], "the worker must travel with nothing but cloudpickle:\n" + "\n".join(bad)


def test_import_checker_catches_foreign_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os, json\nfrom . import protocol\nimport cloudpickle\n"
        "def f():\n    import numpy as np\n    from qjam_nb.dataset import DataSet\n"
        "from .. import errors\n"
    )
    assert sorted(foreign_imports(sample)) == [
        "sample.py:5: import numpy",
        "sample.py:6: import qjam_nb.dataset",
        "sample.py:7: relative import outside the package (..)",
    ]


def test_a_mapfunc_that_keeps_state_in_a_global_starts_from_what_was_shipped_each_call(worker):
    """The worker reuses a mapfunc loaded for the last call only when it cannot carry state across
    calls; one that assigns a global gets a fresh copy, as shipped, every call."""
    namespace = by_value("COUNT = 0\n"
                         "def counting(params, data):\n"
                         "    global COUNT\n"
                         "    COUNT += 1\n"
                         "    return COUNT\n")
    for call in (1, 2):
        worker.call(call, namespace["counting"])
        worker.send(Kind.TASK, {"key": None}, call=call, index=0)
        result, _ = worker.until(Kind.RESULT)
        assert result.body()["value"] == 1
