"""Every bad input of issue 5, one test each: the right error, naming the culprit and the fix, then a working cluster.

Each test asserts (a) the error type, (b) that the message names what is at
fault (host, worker, slice, argument or variable) and what to do, and (c)
that afterwards the same cluster answers a correct call. For host-level
errors no cluster comes into being, so (c) is a cluster on a good host in the
same test, usually started with exactly the fix the message gave.

Host-level tests run on the private sshds of ``ssh_world``, in a HOME of the
test's own (``home``). API-level tests run on both backends (``cluster2`` and
``make_cluster`` are parametrised local/ssh). Magics run in an in-process
IPython (``shell``), on the same backend's cluster.
"""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import sshd
from conftest import OTHER_CLOUDPICKLE, WITH_DASK, skip_in_memory, skip_on_dask

from qjam_nb import (
    CallStarted,
    Cluster,
    ClusterClosedError,
    DataSetError,
    HostError,
    HostKeyError,
    MapFuncError,
    ReduceError,
    RemoteError,
    ShippingError,
    StreamOutput,
    VersionMismatchError,
    WorkerError,
)
from qjam_nb.worker import protocol

BACKENDS = WITH_DASK  # the in-memory and Dask backends too (tests/conftest.py)
ME = getpass.getuser()
DATA = list(range(10))


def answers(cluster: Cluster) -> None:
    """The cluster answers a correct call, with every worker alive."""
    assert cluster.map(lambda p, xs: p * sum(xs), 2, DATA, slice_size=3) == 90
    assert [w.state for w in cluster.workers] == ["idle"] * len(cluster.workers)


def good_host_answers(**options) -> None:
    with Cluster(["sshhost"], echo=False, **options) as cluster:
        answers(cluster)


# -- host-level errors (ssh) ------------------------------------------------------------------


def entry(alias: str, hostname: str, port: int | None = None, identity=None) -> str:
    lines = [f"Host {alias}", f"  HostName {hostname}", f"  User {ME}"]
    lines += [f"  Port {port}"] if port else []
    lines += [f"  IdentityFile {identity}"] if identity else []
    return "\n".join(lines) + "\n\n"


@pytest.fixture
def home(ssh_world, tmp_path, monkeypatch):
    """``make(extra_config, known_hosts=None)``: a HOME of this test's own that knows ``sshhost``/``sshhost2``.

    No default keys in its ~/.ssh: only IdentityFile entries (the shared aliases have one) log in.
    """

    def make(extra: str = "", known: str | None = None):
        root = tmp_path / "home"
        ssh = root / ".ssh"
        ssh.mkdir(parents=True, mode=0o700)
        (ssh / "config").write_text((ssh_world.home / ".ssh" / "config").read_text() + extra)
        if known is None:
            known = "".join(h.known_hosts_line() for h in ssh_world.hosts)
        (ssh / "known_hosts").write_text(known)
        monkeypatch.setenv("HOME", str(root))
        return root

    return make


def test_unknown_host_name(home):
    home(entry("nowhere", "no-such-host.invalid"))
    with pytest.raises(HostError) as info:
        Cluster(["nowhere"], echo=False)
    message = str(info.value)
    assert (info.value.host, info.value.stage) == ("nowhere", "resolving its name")
    assert "'nowhere'" in message and "unknown host name 'no-such-host.invalid'" in message
    assert "check the spelling" in message and "~/.ssh/config" in message
    good_host_answers()


def test_connection_refused(ssh_world, home):
    closed = sshd.free_port("127.0.0.1")
    home(entry("closed", "127.0.0.1", closed, identity=ssh_world.key))
    with pytest.raises(HostError) as info:
        Cluster(["closed"], echo=False)
    message = str(info.value)
    assert (info.value.host, info.value.stage) == ("closed", "connecting")
    assert f"connection refused by 127.0.0.1 port {closed}" in message
    assert "is sshd running" in message and "--port" in message
    # The fix the message names: the right port, for the same alias.
    with Cluster(["closed"], port=ssh_world.hosts[0].port, echo=False) as cluster:
        answers(cluster)


def test_authentication_refused(ssh_world, home):
    root = home(entry("keyless", "127.0.0.1", ssh_world.hosts[0].port))
    wrong = sshd.keygen(root / ".ssh" / "not_authorized")
    with pytest.raises(HostError) as info:
        Cluster(["keyless"], identity=str(wrong), echo=False)
    message = str(info.value)
    assert (info.value.host, info.value.stage) == ("keyless", f"logging in as {ME!r}")
    assert f"authentication refused; tried {wrong}" in message
    assert "authorized_keys" in message and "--identity" in message
    with Cluster(["keyless"], identity=str(ssh_world.key), echo=False) as cluster:
        answers(cluster)


def test_unknown_host_key(ssh_world, home):
    h1, h2 = ssh_world.hosts
    home(known=h2.known_hosts_line())  # sshhost2 is known, sshhost is not
    with pytest.raises(HostKeyError) as info:
        Cluster(["sshhost"], echo=False)
    message = str(info.value)
    assert (info.value.host, info.value.stage) == ("sshhost", "checking its host key")
    assert f"[127.0.0.1]:{h1.port} is not in" in message and "SHA256:" in message
    assert "accept_new_host=True" in message and "--accept-new-host" in message
    with Cluster(["sshhost2"], echo=False) as cluster:  # a known host, in the same HOME
        answers(cluster)
    good_host_answers(accept_new_host=True)  # the fix the message gave
    good_host_answers()  # and now it is known


def test_changed_host_key(ssh_world, home):
    h1, h2 = ssh_world.hosts
    impostor = h2.known_hosts_line().split(" ", 1)[1]  # sshhost2's key, filed under sshhost's name
    root = home(known=f"[127.0.0.1]:{h1.port} {impostor}" + h2.known_hosts_line())
    for accept in (False, True):  # refused loudly, even when accepting new hosts
        with pytest.raises(HostKeyError) as info:
            Cluster(["sshhost"], accept_new_host=accept, echo=False)
        message = str(info.value)
        assert (info.value.host, info.value.stage) == ("sshhost", "checking its host key")
        assert f"THE HOST KEY OF [127.0.0.1]:{h1.port} HAS CHANGED" in message
        assert f"ssh-keygen -R '[127.0.0.1]:{h1.port}'" in message and "--accept-new-host" in message
    with Cluster(["sshhost2"], echo=False) as cluster:
        answers(cluster)
    # The fix the message gave: remove the old line, then accept the host again.
    subprocess.run(["ssh-keygen", "-R", f"[127.0.0.1]:{h1.port}", "-f", str(root / ".ssh" / "known_hosts")],
                   check=True, capture_output=True)
    good_host_answers(accept_new_host=True)


def test_remote_python_missing(ssh_world, home):
    home()
    with pytest.raises(HostError) as info:
        Cluster(["sshhost"], python="/nonexistent/python3", echo=False)
    message = str(info.value)
    assert (info.value.host, info.value.stage) == ("sshhost", "finding a Python")
    assert "'/nonexistent/python3'" in message and "--python" in message
    good_host_answers(python=sys.executable)


def test_remote_python_too_old(ssh_world, home, tmp_path):
    """There is no Python 2.7 on this machine, so ``python2.7`` here is a small shell script standing in
    for one: it prints exactly what a Python 2.7.18 prints for our probe (``payload.PROBE``: a JSON line of
    version, executable, cache root and readiness), and nothing else. The refusal is decided on that line.
    """
    home()
    fake = tmp_path / "python2.7"
    fake.write_text(
        "#!/bin/sh\n"
        "# NOT a Python: answers qjam_nb's probe as Python 2.7.18 would (json.dumps of the probe's dict).\n"
        'printf \'{"python": "2.7.18", "executable": "%s", "root": "%s/.cache/qjam_nb", "ready": false}\\n\' '
        '"$0" "$HOME"\n'
    )
    fake.chmod(0o755)
    with pytest.raises(HostError) as info:
        Cluster(["sshhost"], python=str(fake), echo=False)
    message = str(info.value)
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert (info.value.host, info.value.stage) == ("sshhost", "checking its Python")
    assert f"{fake} is Python 2.7.18" in message
    assert f"Point --python (or QJAM_REMOTE_PYTHON) at a Python {mine} on that host" in message
    good_host_answers(python=sys.executable)


def test_version_mismatch(ssh_world, python_with_other_cloudpickle):
    import cloudpickle

    with pytest.raises(VersionMismatchError) as info:
        Cluster(["sshhost:2"], python=str(python_with_other_cloudpickle), echo=False)
    message = str(info.value)
    for worker in ("sshhost/0", "sshhost/1"):
        assert f"worker {worker} cannot exchange pickles" in message
    assert f"cloudpickle {OTHER_CLOUDPICKLE} there, {cloudpickle.__version__} here" in message
    assert "Point --python" in message
    good_host_answers(python=sys.executable)


# -- the magics, in an in-process IPython -----------------------------------------------------------

GOOD_CELL = "%%qjam_map -p 2 -d list(range(10)) --slice-size 3 -o answer\ndef mapfunc(p, xs):\n    return p * sum(xs)"


@pytest.fixture(scope="module")
def shell(backend):
    """IPython with qjam_nb loaded and ``%qjam_hosts local:2`` (or ``sshhost:2``) running."""
    from IPython.testing import globalipapp

    globalipapp.start_ipython()
    ip = globalipapp.get_ipython()
    if "QjamMagics" not in ip.magics_manager.registry:
        ip.run_cell("%load_ext qjam_nb")
    result = ip.run_cell("%qjam_hosts " + ("sshhost:2" if backend == "ssh" else "local:2"))
    assert result.success, result.error_in_exec
    yield ip
    ip.run_cell("%qjam_shutdown")


def notebook_cluster(ip) -> Cluster:
    return ip.magics_manager.registry["QjamMagics"].cluster


def cell_fails(ip, capsys, cell: str, kind: type = None) -> str:
    """Run ``cell``; return the message of the error it raised (a UsageError shows no traceback)."""
    from IPython.core.error import UsageError

    kind = kind or UsageError
    capsys.readouterr()
    result = ip.run_cell(cell)
    error = result.error_in_exec
    assert isinstance(error, kind), (error, capsys.readouterr())
    if kind is UsageError:
        err = capsys.readouterr().err
        assert f"UsageError: {error}" in err and "Traceback" not in err
    return str(error)


def notebook_answers(ip) -> None:
    cluster = notebook_cluster(ip)
    ip.user_ns.pop("answer", None)
    result = ip.run_cell(GOOD_CELL)
    assert result.success, result.error_in_exec
    assert result.result == 90 and ip.user_ns["answer"] == 90
    assert notebook_cluster(ip) is cluster and not cluster.closed
    assert [w.state for w in cluster.workers] == ["idle", "idle"]


def test_map_cell_without_mapfunc(shell, capsys):
    cluster = notebook_cluster(shell)
    message = cell_fails(shell, capsys, "%%qjam_map -d [1, 2]\ndef mapfun(p, xs):\n    return 1")
    assert "this cell defines no mapfunc" in message and "def mapfunc(params, slice)" in message
    assert notebook_cluster(shell) is cluster
    notebook_answers(shell)


WRONG_ARITY = [
    ("one", "def mapfunc(xs):", "mapfunc(xs)"),
    ("three", "def mapfunc(p, xs, extra):", "mapfunc(p, xs, extra)"),
    ("none", "def mapfunc():", "mapfunc()"),
]


@pytest.mark.parametrize("via", ["api", "magics"])
@pytest.mark.parametrize(("header", "shown"), [a[1:] for a in WRONG_ARITY], ids=[a[0] for a in WRONG_ARITY])
def test_mapfunc_with_the_wrong_number_of_parameters(cluster2, shell, capsys, via, header, shown):
    if via == "api":
        namespace: dict = {}
        exec(f"{header}\n    return 1", namespace)
        with pytest.raises(MapFuncError) as info:
            cluster2.map(namespace["mapfunc"], None, DATA)
        message = str(info.value)
        answers(cluster2)
    else:
        message = cell_fails(shell, capsys, f"%%qjam_map -d [1, 2]\n{header}\n    return 1", MapFuncError)
        notebook_answers(shell)
    assert f"mapfunc must take two arguments, (params, slice); {shown} cannot" in message


@pytest.mark.parametrize(
    ("flag", "expr", "raised"),
    [("-p", "1 / 0", "ZeroDivisionError"), ("-d", "no_such_variable", "NameError"),
     ("-d", "[1, 2][5]", "IndexError")],
)
def test_params_or_dataset_expression_that_raises(shell, capsys, flag, expr, raised):
    message = cell_fails(shell, capsys, f"%%qjam_map {flag} {expr}\ndef mapfunc(p, xs):\n    return 1")
    assert message.startswith(f"{flag} {expr!r} raised {raised}")
    assert "correct the expression" in message
    notebook_answers(shell)


@pytest.mark.parametrize("out", ["1x", "a-b", "x.y"])
def test_out_not_an_identifier(shell, capsys, out):
    message = cell_fails(shell, capsys, f"%%qjam_map -o {out} -d [1]\ndef mapfunc(p, xs):\n    return 1")
    assert message == f"-o needs a variable name, and {out!r} is not one"
    assert out not in shell.user_ns
    notebook_answers(shell)


# -- what is shipped ----------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["api", "magics"])
def test_unpicklable_object_in_the_closure(cluster2, shell, capsys, via):
    if via == "api":
        held_lock = threading.Lock()

        def mapfunc(p, xs):
            with held_lock:
                return len(xs)

        with pytest.raises(ShippingError) as info:
            cluster2.map(mapfunc, None, DATA)
        message = str(info.value)
        assert "it uses the variable 'held_lock' (a _thread.lock)" in message
        answers(cluster2)
    else:
        shell.run_cell("import threading\nnotebook_lock = threading.Lock()")
        message = cell_fails(shell, capsys,
                             "%%qjam_map -d [1, 2]\ndef mapfunc(p, xs):\n    with notebook_lock:\n        return 1",
                             ShippingError)
        assert "it uses the global 'notebook_lock' (a _thread.lock)" in message
        notebook_answers(shell)
    assert "mapfunc cannot be shipped to the workers" in message
    assert "Create it inside mapfunc, or pass the data it holds as params or dataset" in message


# -- the dataset ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "named", "fix"),
    [
        (lambda: (i for i in range(3)), "type generator", "pass list(...) of it"),
        (lambda: {"a": 1, "b": 2}, "type dict", "pass list(d.items())"),
        (lambda: 42, "type int", "give a list, tuple, numpy array or .npy path"),
        (lambda: np.array(3.0), "a 0-dimensional array", "give an array with rows"),
    ],
    ids=["generator", "dict", "scalar", "0-d array"],
)
def test_dataset_that_cannot_be_sliced(cluster2, make, named, fix):
    with pytest.raises(DataSetError) as info:
        cluster2.map(lambda p, xs: 1, None, make())
    message = str(info.value)
    assert "cannot slice" in message or "cannot be sliced" in message
    assert named in message and fix in message
    answers(cluster2)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "slice_size must be at least 1, not 0"),
        (-3, "slice_size must be at least 1, not -3"),
        (1.5, "slice_size must be a positive whole number, not 1.5"),
        ("2", "slice_size must be a positive whole number, not '2'"),
        (True, "slice_size must be a positive whole number, not True"),
    ],
)
def test_slice_size_not_a_positive_int(cluster2, size, expected):
    with pytest.raises(DataSetError) as info:
        cluster2.map(lambda p, xs: 1, None, DATA, slice_size=size)
    assert str(info.value) == expected
    answers(cluster2)


def test_slice_size_in_magics(shell, capsys):
    message = cell_fails(shell, capsys, "%%qjam_map -d [1, 2] --slice-size x\ndef mapfunc(p, xs):\n    return 1")
    assert message == "argument --slice-size: invalid int value: 'x'"
    message = cell_fails(shell, capsys, "%%qjam_map -d [1, 2] --slice-size 0\ndef mapfunc(p, xs):\n    return 1",
                         DataSetError)
    assert message == "slice_size must be at least 1, not 0"
    notebook_answers(shell)


@pytest.mark.parametrize(
    ("data", "what"),
    [([], "a list of length 0"), ((), "a tuple of length 0"), (np.empty((0, 3)), "an array of length 0")],
    ids=["list", "tuple", "array"],
)
def test_empty_dataset(cluster2, data, what):
    with pytest.raises(DataSetError) as info:
        cluster2.map(lambda p, xs: 1, None, data)
    assert str(info.value) == (f"the dataset is empty ({what}): give it at least one item, "
                               "or call map without a dataset")
    answers(cluster2)


# -- results and reduce ----------------------------------------------------------------------------------


def test_a_result_the_worker_cannot_pickle(cluster2):
    with pytest.raises(RemoteError) as info:
        cluster2.map(lambda p, xs: threading.Lock() if xs == [3] else xs[0], None, list(range(6)), slice_size=1)
    error = info.value
    assert error.index == 3 and error.worker in cluster2.worker_names
    assert error.where == "pickling the result" and error.remote_type == "TypeError"
    assert "_thread.lock" in error.remote_message
    assert "return plain data" in error.remote_message  # what to do
    assert f"(on worker {error.worker}, slice 3, while pickling the result)" in str(error)
    answers(cluster2)


def test_results_reduce_cannot_combine(cluster2):
    with pytest.raises(ReduceError) as info:
        cluster2.map(lambda p, xs: "text" if xs[0] == 2 else xs[0], None, list(range(5)), slice_size=1)
    message = str(info.value)
    assert ("the default reduce (a + b) could not combine the result of slices 0..1 (int) "
            "with the result of slice 2 (str): TypeError") in message
    assert "Return values that add up, or define reduce(a, b)" in message
    answers(cluster2)


def test_a_reduce_that_raises(cluster2):
    def picky(a, b):
        if b == 3:
            raise ValueError("three is not welcome")
        return a + b

    with pytest.raises(ReduceError) as info:
        cluster2.map(lambda p, xs: xs[0], None, list(range(6)), reduce=picky, slice_size=1)
    message = str(info.value)
    assert ("your reduce could not combine the result of slices 0..2 (int) with the result of slice 3 (int): "
            "ValueError: three is not welcome") in message
    assert "define reduce(a, b)" in message
    answers(cluster2)


# -- what comes back from a worker -------------------------------------------------------------------


def test_an_oversized_frame_from_a_worker(make_cluster, monkeypatch, backend):
    """A RESULT over the master's frame limit kills its worker; after two workers, the slice is given up.

    The limit is lowered before the cluster starts: each Link reads ``protocol.MAX_FRAME`` when it is made,
    so lowering it later would not reach the links already running. The mapfunc runs 0.2 s, so that it
    says STARTED (a slice does at 3 ms) and that frame reaches the master in a read of its own, before
    the bad RESULT: the blame then comes from the worker's own word, not from the order of its tasks.
    """
    skip_on_dask(backend, "about our workers' frames")
    monkeypatch.setattr(protocol, "MAX_FRAME", 256 << 10)
    cluster = make_cluster(["local:2"])

    def huge(p, xs):
        import time

        time.sleep(0.2)
        return b"x" * (1 << 20) if xs[0] == 1 else b""

    with pytest.raises(WorkerError) as info:
        cluster.map(huge, None, list(range(4)), slice_size=1)
    message = str(info.value)
    assert message.startswith("slice 1 killed 2 workers in turn, so it is not tried again")
    for worker in cluster.worker_names:
        assert f"{worker} died running slice 1: protocol error from worker {worker}: oversized RESULT frame" in message
    assert "the limit is 262144; use smaller slices (slice_size=) or raise QJAM_MAX_FRAME" in message
    monkeypatch.undo()
    answers(cluster)  # both workers were started again
    assert [w.starts for w in cluster.workers] == [2, 2]


def test_a_malformed_frame_from_a_worker(make_cluster, backend):
    skip_in_memory(backend, "writes onto a worker process's protocol stream (fd 1)")
    skip_on_dask(backend, "about our workers' frames")
    cluster = make_cluster(["local:2"])

    def scribble(p, xs):
        """On slice 2, write bytes that are no frame straight onto the worker's protocol stream.

        (After a pause, so that STARTED reaches the master in a read of its own: see the test above.)
        """
        import gc
        import sys
        import time

        if xs[0] != 2:
            return xs[0]
        time.sleep(0.2)
        channel_class = sys.modules["qjam_worker.main"].Channel
        (channel,) = [o for o in gc.get_objects() if isinstance(o, channel_class)]
        with channel.lock:
            os.write(channel.fd, b"garbage!" * 4)
        time.sleep(30)  # the master kills us first

    with pytest.raises(WorkerError) as info:
        cluster.map(scribble, None, list(range(4)), slice_size=1, timeout=30)
    message = str(info.value)
    assert message.startswith("slice 2 killed 2 workers in turn, so it is not tried again")
    for worker in cluster.worker_names:
        assert (f"{worker} died running slice 2: protocol error from worker {worker}: "
                "malformed frame: bad magic b'garbage!'") in message
    assert "something other than qjam_nb wrote to the stream" in message
    answers(cluster)
    assert [w.starts for w in cluster.workers] == [2, 2]


def test_a_mapfunc_that_prints_megabytes(cluster2, record, backend):
    """20 MiB printed per worker: no deadlock, 1 MiB forwarded per worker, and a note on what was dropped."""
    skip_in_memory(backend, "its workers print to this process's stdout: nothing is forwarded")
    skip_on_dask(backend, "a Dask worker's output has its own bound (16 KiB a slice, daskbatch.OUTPUT_LIMIT)")
    log = record(cluster2)

    def chatty(p, xs):
        import sys

        block = (b"y" * 1023 + b"\n") * 1024  # 1 MiB
        for _ in range(20):
            sys.stdout.buffer.write(block)
        sys.stdout.flush()
        return 1

    assert cluster2.map(chatty, timeout=60) == 2
    call = log.of(CallStarted)[-1].call
    for worker in cluster2.worker_names:
        out = [e for e in log.of(StreamOutput) if e.worker == worker and e.call == call]
        forwarded = sum(len(e.text.encode()) for e in out if e.stream == "stdout")
        assert 1 << 20 <= forwarded <= (1 << 20) + (64 << 10)
        notes = [e.text for e in out if e.stream == "stderr" and "more output dropped" in e.text]
        assert len(notes) == 1, notes
        dropped = float(re.search(r"qjam_nb: ([\d.]+) MiB more output dropped", notes[0]).group(1))
        assert abs(dropped + forwarded / 2**20 - 20) <= 0.06
        assert "each call forwards the first 1 MiB of a worker's output" in notes[0]
    answers(cluster2)
    # The budget is per call: the next call forwards output again.
    log.clear()
    assert cluster2.map(lambda p, xs: print("hello again") or 1) == 2
    assert sum("hello again" in e.text for e in log.of(StreamOutput)) == 2


def test_map_after_shutdown(make_cluster):
    cluster = make_cluster(["local:2"])
    cluster.shutdown()
    for attempt in (lambda: cluster.map(lambda p, xs: 1), cluster.restart):
        with pytest.raises(ClusterClosedError) as info:
            attempt()
        assert str(info.value) == "this cluster was shut down: start a new one (Cluster(...) or %qjam_hosts)"
    answers(make_cluster(["local:2"]))  # the fix the message gave
