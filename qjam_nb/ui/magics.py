"""The notebook magics: parse a line, call the plain API, display the result.

``%qjam_hosts``, ``%%qjam_map``, ``%qjam_status``, ``%qjam_timeline``, ``%qjam_replay`` and
``%qjam_shutdown``; each one's docstring (``%qjam_map?``) has examples.
Everything they do can be done from Python with ``Cluster``; mistakes in
what the user typed raise IPython's ``UsageError`` (a message, no traceback).
"""

from __future__ import annotations

import keyword
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from ..cluster.cachemap import cache_map_text
from ..cluster.cluster import DEFAULT_HOSTS, Cluster
from ..cluster.progress import TqdmProgress


@magics_class
class QjamMagics(Magics):
    """Holds the notebook's cluster between cells."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.cluster: Cluster | None = None

    # -- helpers ---------------------------------------------------------------
    @property
    def in_kernel(self) -> bool:
        """True in Jupyter (widgets can render), False in terminal IPython."""
        return getattr(self.shell, "kernel", None) is not None

    def _show_cluster(self) -> None:
        if self.in_kernel:
            from .widget import ClusterWidget

            display(ClusterWidget(self.cluster))
        else:
            print(self.cluster.status.text())

    def _start(self, hosts: list[str] | None, **options: Any) -> Cluster:
        self.shutdown()
        self.cluster = Cluster(hosts, progress=False, **options)
        if not self.in_kernel:
            self.cluster.events.subscribe(TqdmProgress())
        return self.cluster

    def shutdown(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None

    def _eval(self, words: list[str] | None, flag: str) -> Any:
        """Evaluate an option's expression (argparse split it at spaces) in the notebook."""
        if words is None:
            return None
        expr = " ".join(words)
        try:
            return eval(expr, self.shell.user_ns)
        except Exception as exc:
            raise UsageError(f"{flag} {expr!r} raised {type(exc).__name__}: {exc}; correct the expression "
                             "(it is evaluated in the notebook's namespace)") from None

    # -- magics ----------------------------------------------------------------
    @line_magic
    @magic_arguments()
    @argument("hosts", nargs="*", help="'local', 'local:N' (N workers here), or hosts you can ssh to (HOST or HOST:N); "
              "or one Dask cluster: dask://HOST:PORT, dask:SCHEDULER_FILE or dask:local:N")
    @argument("-n", "--workers-per-host", type=int, default=1, help="workers on each host given without ':N'")
    @argument("--dask", nargs="+", default=None, metavar="CLIENT",
              help="run on the workers of a distributed.Client: an expression in the notebook (client, "
              "Client(slurm_cluster), ...), instead of hosts")
    @argument("--user", default=None, help="remote user name (default: QJAM_USER, ~/.ssh/config, your name)")
    @argument("--port", type=int, default=None, help="ssh port (default: ~/.ssh/config, else 22)")
    @argument("--identity", default=None, help="private key file to log in with (besides agent and ~/.ssh keys)")
    @argument("--python", default=None, help="Python on the ssh hosts, or a wrapper script that runs it (it "
              "starts the workers too); default: QJAM_REMOTE_PYTHON, this notebook's interpreter path if it "
              "exists there, else python3")
    @argument("--accept-new-host", action="store_true",
              help="trust a host whose key is in no known-hosts file yet, and record its key in the first "
              "(~/.ssh/known_hosts unless UserKnownHostsFile says otherwise)")
    @argument("--blas-threads", default="auto",
              help="BLAS/OpenMP threads of each worker (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS, "
              "VECLIB_MAXIMUM_THREADS, NUMEXPR_NUM_THREADS): auto (default) gives each its share of its host's "
              "usable cores (affinity and cgroup quota) // this cluster's workers there, unless the worker's "
              "environment sets one (a local worker's is this notebook's; an ssh host's own is kept, this "
              "notebook's is not forwarded); N: N each; off: leave the environment alone")
    def qjam_hosts(self, line: str = "") -> Cluster:
        """Start workers, or show the cluster widget again; returns the Cluster.

        Examples::

            %qjam_hosts local:2            # two worker processes on this machine
            %qjam_hosts local -n 4         # the same, four of them
            %qjam_hosts node1 node2 -n 4   # four workers on each of two hosts, over ssh
            %qjam_hosts --user bob --port 2222 --identity ~/.ssh/id_ed25519 --python /opt/py/bin/python3 node3
            %qjam_hosts local:2 --blas-threads off  # numpy's threads as the environment says (see below)
            %qjam_hosts dask:local:2       # a Dask LocalCluster here (dask://HOST:PORT: a running scheduler)
            %qjam_hosts --dask client      # the workers of a distributed.Client of the notebook
            %qjam_hosts                    # show the running cluster again
            cluster = %qjam_hosts local:2  # keep the Cluster, for cluster.map(...) in loops

        ssh hosts are reached as ``ssh`` would: ``~/.ssh/config`` (HostName, User,
        Port, IdentityFile, IdentitiesOnly, ProxyJump, HostKeyAlias,
        UserKnownHostsFile, GlobalKnownHostsFile, HashKnownHosts), your ssh agent
        and keys, and host keys checked against the known-hosts files
        (``~/.ssh/known_hosts`` and ``/etc/ssh/ssh_known_hosts`` by default).
        Nothing needs installing there but Python.

        Each worker's BLAS threads are its share of its host's cores (``--blas-threads``),
        so that numpy in two workers on two cores runs two BLAS threads, not four
        (hover a worker's name in the widget, or see ``%qjam_status``'s BLAS column).

        Starting a new cluster stops the previous one (and drops its cache).
        """
        args = parse_argstring(self.qjam_hosts, line)
        if args.dask is not None:
            if args.hosts:
                raise UsageError("give hosts or --dask CLIENT, not both: the Dask client's workers are the cluster's")
            self._start(None, dask=self._eval(args.dask, "--dask"))
        elif args.hosts:
            if args.workers_per_host < 1:
                raise UsageError(f"-n must be at least 1, not {args.workers_per_host}")
            self._start(
                args.hosts, workers_per_host=args.workers_per_host, user=args.user, port=args.port,
                identity=args.identity, python=args.python, accept_new_host=args.accept_new_host,
                blas_threads=blas_threads_option(args.blas_threads),
            )
        elif self.cluster is None:
            raise UsageError("no cluster is running: start one with %qjam_hosts local:2")
        self._show_cluster()
        return self.cluster

    @line_magic
    def qjam_status(self, line: str = "") -> None:
        """Show every worker's state, progress and cached slices, the last call's timeline, and the chaos buttons.

        Each row is a worker: its state (hover it for why: "restarted",
        "killed by chaos" ...; hover its name for its BLAS threads, and why), its
        progress in the current call, and which slices of the last call's
        dataset it holds in its cache. Outside
        Jupyter it prints the same as text.

        Examples::

            %qjam_status
            cluster = %qjam_hosts           # the Cluster, for the same from Python:
            cluster.cache_info()            # {worker: (cached slices, cached bytes)}
            cluster.last_call.totals()      # bytes sent and saved, compute vs transfer vs reduce seconds
        """
        if self.cluster is None:
            raise UsageError("no cluster is running: start one with %qjam_hosts local:2, then %qjam_status")
        self._show_cluster()
        if not self.in_kernel:  # the widget shows it in its "holds slices" column
            print(cache_map_text(self.cluster.last_call, self.cluster.workers))

    @line_magic
    def qjam_timeline(self, line: str = "") -> None:
        """Show a call's timeline: who ran which slice, when, shipped or cached, and where the time went.

        One lane per worker and one bar per slice: orange if its data was shipped,
        teal if it came from the worker's cache, the darker start being the
        worker's compute; a red cross marks a slice whose worker died (it runs
        again on another lane). Underneath: bytes sent, bytes saved by the
        cache, and compute vs transfer vs reduce seconds. Outside Jupyter it
        prints a summary per worker instead.

        Examples::

            %qjam_timeline        # the last call
            %qjam_timeline 3      # call 3, if still remembered (the last 20 are)
            cluster.last_call     # the same data from Python: .slices, .totals(), .done_slices(), .moved()

        ``%%qjam_map ... --timeline`` shows it live under the cell while the call runs.
        """
        if self.cluster is None:
            raise UsageError("no cluster is running: start one with %qjam_hosts local:2, run a %%qjam_map cell, "
                             "then %qjam_timeline")
        calls = self.cluster.calls
        if not calls:
            raise UsageError("no call yet: run a %%qjam_map cell (or cluster.map(...)) first, then %qjam_timeline")
        word = line.strip()
        if word and not word.isdigit():
            raise UsageError(f"%qjam_timeline takes a call number (or nothing, for the last call), not {word!r}")
        record = next((c for c in calls if c.call == int(word)), None) if word else calls[-1]
        if record is None:
            raise UsageError(f"call {word} is not remembered; these are: {', '.join(str(c.call) for c in calls)}")
        if self.in_kernel:
            from .timeline import TimelineWidget

            display(TimelineWidget(self.cluster, call=record.call))
        else:
            print(record.summary())

    @line_magic
    @magic_arguments()
    @argument("slice", type=int, help="the slice to run again: its index, as the timeline and errors show it")
    @argument("--call", type=int, default=None,
              help="which call (default: the last; the last 3 are remembered)")
    def qjam_replay(self, line: str = "") -> Any:
        """Run one slice of the last call again here, in the notebook, and return mapfunc's value for it.

        To debug a mapfunc with ordinary tools: the function and params are
        unpickled from the very bytes the workers got, and the slice is checked
        to be unchanged since the call, so the value is bit-identical to what
        the worker returned; if mapfunc raises, it raises here, where
        ``%debug`` and breakpoints work. It says why when a slice cannot be
        replayed (no such slice, call no longer remembered, data changed).

        Examples::

            %qjam_replay 3              # slice 3 of the last call
            %qjam_replay 3 --call 5     # slice 3 of call 5 (one of the last 3 calls)
            value = %qjam_replay 0      # keep the value
            %debug                      # after a replay that raised: walk mapfunc's frames
            cluster.replay(3, call=5)   # the same from Python
        """
        if not line.strip():
            raise UsageError("say which slice: %qjam_replay SLICE [--call N], e.g. %qjam_replay 0")
        args = parse_argstring(self.qjam_replay, line)
        if self.cluster is None:
            raise UsageError("no cluster is running: start one with %qjam_hosts local:2 and run a %%qjam_map cell; "
                             "then %qjam_replay 0 runs its slice 0 here")
        return self.cluster.replay(args.slice, args.call)

    @line_magic
    def qjam_shutdown(self, line: str = "") -> None:
        """Stop every worker of the notebook's cluster (their caches go with them).

        Workers also stop by themselves when the kernel ends or restarts.

        Examples::

            %qjam_shutdown
            %qjam_hosts local:4             # a new cluster (this also stops the old one first)
        """
        if self.cluster is None:
            print("no cluster is running (start one with %qjam_hosts local:2)")
            return
        n = len(self.cluster.workers)
        self.shutdown()
        print(f"stopped {n} workers")

    @cell_magic
    @magic_arguments()
    @argument("-p", "--params", nargs="+", default=None, help="the params every slice gets (default None)")
    @argument("-d", "--dataset", nargs="+", default=None, help="the dataset (default: none; every worker runs once)")
    @argument("-o", "--out", default=None, help="also store the reduced result in this variable")
    @argument("--slice-size", type=int, default=None, help="items per slice (default: see DataSet)")
    @argument("--reduce", default=None, help="name of a reduce(a, b) function (default: the cell's reduce, else a + b)")
    @argument("--timeline", action="store_true",
              help="show the call's timeline under the cell, live while it runs (see %%qjam_timeline)")
    def qjam_map(self, line: str, cell: str) -> Any:
        """Run the cell's ``mapfunc(params, slice)`` on every slice and reduce the results.

        The cell defines ``mapfunc`` (and optionally ``reduce(a, b)``) and may use
        any notebook variable or function. The reduced result is the cell's
        value. The dataset (``-d``) is cut into slices that stay cached on the
        workers, so the next call over the same data ships only mapfunc and
        params (``-p``): pass big data that way, not as a variable mapfunc
        uses (that travels on every call, and a ``CaptureWarning`` says so).
        Without ``-d`` every worker runs ``mapfunc(params, [])`` once; with no
        cluster yet, ``local:2`` is started.

        Examples::

            %%qjam_map -p theta -d X -o grad
            def mapfunc(theta, xs):
                return xs.T @ (xs @ theta - 1)

            %%qjam_map -d words --slice-size 1000 -o counts
            import collections
            def mapfunc(params, words):
                return collections.Counter("".join(words))   # the default reduce adds dicts key by key

            %%qjam_map -d list(range(100)) --timeline
            def mapfunc(params, xs):
                return [max(xs)]
            def reduce(a, b):                                # instead of a + b
                return [max(a[0], b[0])]

        Then ``%qjam_timeline`` shows who ran which slice, ``%qjam_replay 3``
        runs slice 3 again here (to debug it), and ``cluster.map(mapfunc,
        theta, X)`` does the same from Python, e.g. in a loop.
        """
        args = parse_argstring(self.qjam_map, line)
        if args.out is not None and (not args.out.isidentifier() or keyword.iskeyword(args.out)):
            raise UsageError(f"-o needs a variable name, and {args.out!r} is not one")
        params = self._eval(args.params, "-p")
        dataset = self._eval(args.dataset, "-d")
        namespace = self._run_cell(cell)
        mapfunc = namespace.get("mapfunc")
        if mapfunc is None:
            raise UsageError("this cell defines no mapfunc: define def mapfunc(params, slice): ... in it")
        reduce = namespace.get("reduce")
        if args.reduce is not None:
            reduce = namespace.get(args.reduce)
            if reduce is None:
                raise UsageError(f"--reduce {args.reduce!r}: no function of that name in the cell or notebook")
        if self.cluster is None or self.cluster.closed:
            print(f"starting {' '.join(DEFAULT_HOSTS)} (choose hosts with %qjam_hosts)")
            self._start(list(DEFAULT_HOSTS))
        progress = timeline = None
        if self.in_kernel:
            from .widget import CallProgress

            progress = CallProgress(self.cluster)
            display(progress)
            if args.timeline:
                from .timeline import TimelineWidget

                timeline = TimelineWidget(self.cluster)
                display(timeline)
        try:
            result = self.cluster.map(mapfunc, params, dataset, reduce=reduce, slice_size=args.slice_size)
        finally:
            for view in (progress, timeline):
                if view is not None:
                    view.redraw()
                    view.close()
            if args.timeline and not self.in_kernel and self.cluster.last_call is not None:
                print(self.cluster.last_call.summary())
        if args.out is not None:
            self.shell.user_ns[args.out] = result
        return result

    def _run_cell(self, cell: str) -> dict:
        """Run the cell's code in a copy of the notebook namespace, and return that copy.

        A copy, so the cell sees every notebook variable, but a ``mapfunc`` or
        ``reduce`` defined elsewhere in the notebook is never picked up by
        mistake (``from functools import reduce`` is common).
        """
        namespace = dict(self.shell.user_ns)
        namespace.pop("mapfunc", None)
        namespace.pop("reduce", None)
        code = self.shell.transform_cell(cell)
        filename = self.shell.compile.cache(code, self.shell.execution_count, raw_code=cell)
        exec(compile(code, filename, "exec"), namespace)
        return namespace


def load_ipython_extension(ipython: Any) -> None:
    magics = QjamMagics(ipython)
    ipython.register_magics(magics)


def unload_ipython_extension(ipython: Any) -> None:
    magics = ipython.magics_manager.registry.get("QjamMagics")
    if magics is not None:
        magics.shutdown()


def blas_threads_option(text: str) -> int | bool | None:
    """``--blas-threads``'s value as ``Cluster(blas_threads=)`` takes it: auto -> None, off -> False, N -> N."""
    word = text.strip().lower()
    if word == "auto":
        return None
    if word == "off":
        return False
    if word.isdigit() and int(word) >= 1:
        return int(word)
    raise UsageError(f"--blas-threads takes auto, off or a number of threads of at least 1, not {text!r}")
