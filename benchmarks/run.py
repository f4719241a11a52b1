"""qjam_nb next to its references and peers, every workload of issue 6, in one run.

``python benchmarks/run.py`` (``--repeat N``, ``--quick``, ``--only ROWS``)
measures, on this machine and in this one run:

* qjam_nb on ``local:2`` (and on 2 ssh workers of a private sshd on
  127.0.0.1, started here by ``tests/sshd.py`` and stopped by its pid);
* the raw limits of the same paths: ``os.pipe`` between two processes,
  pickle protocol 5 ``dumps``/``loads``, paramiko send/receive on the same
  sshd (the transport set up as qjam_nb's, and every cipher both sides offer);
* the peers, each doing the same work with its own natural API:
  ``multiprocessing.Pool``, ``concurrent.futures.ProcessPoolExecutor``,
  ipyparallel, dask.distributed (``LocalCluster``, processes, 1 thread each),
  execnet (popen and ssh gateways) and joblib (loky, with its automatic
  memory-mapping of large arrays). A peer that is not installed says so in
  its cell (``pip install -e '.[bench]'`` installs them all).

It prints every measurement as median (min-max) over the repetitions, then
one summary line per row: the issue's target, the ratio against it, and the
ratio against the best peer. The numbers (every sample) go to
``benchmarks/results/run.json``, the ratios to a plot,
``benchmarks/results/run.png``. MB is 10^6 bytes; MiB is 2^20.

Rows (``--only`` takes these names, comma-separated): ``trivial``,
``params``, ``dataset`` (first and second call), ``cold``, ``scale``,
``paper`` (``benchmarks/sparse_autoencoder.py``'s ``measure``), ``qjam2010``
(qjam 2010's ``Master.run`` of its autoencoder, ``benchmarks/qjam2010_autoencoder.py``), ``heal``
(one of 3 workers slowed 2x, 5x, 10x on cached data: qjam_nb against the ideal and dask, ``benchmarks/heal.py``),
``dask`` (qjam_nb on a Dask ``LocalCluster`` against plain Dask on the same one and qjam_nb's own
``local:2``, ``benchmarks/ondask.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Heavy imports (qjam_nb, paramiko, the peers) happen inside functions: dask starts its workers with
# multiprocessing's "spawn", which runs this file's top level again in each of them.

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(ROOT / "tests"), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchmarks.limits import SshWorld  # noqa: E402  (the package, found through ROOT above)
from benchmarks.measure import Bench  # noqa: E402
from benchmarks.peers.base import (  # noqa: E402, F401  (named __main__.*: see there)
    hetero_slice,
    inc_slice,
    list_sum,
    one,
    plus_one,
    theta_plus,
    total,
)
from benchmarks.report import evaluate, plot, print_tables, versions  # noqa: E402
from benchmarks.rows import GROUP_ALIASES, GROUPS, MB, Config  # noqa: E402
from benchmarks.samples import Results, log  # noqa: E402

RESULTS_DIR = HERE / "results"


def parse_only(text: str | None) -> set[str]:
    if not text:
        return set(GROUPS)
    groups = set()
    for name in text.split(","):
        name = GROUP_ALIASES.get(name.strip(), name.strip())
        if name not in GROUPS:
            raise SystemExit(f"--only: unknown row {name!r}; rows are {', '.join(GROUPS)}")
        groups.add(name)
    return groups


def run(cfg: Config, groups: set[str], out_dir: Path) -> Results:
    import sshd  # tests/sshd.py

    res = Results(cfg)
    res.meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "repeat": cfg.repeat, "quick": cfg.quick,
                "rows": sorted(groups), "cpus": os.cpu_count(), "machine": platform.machine(),
                "versions": versions(), "dataset_bytes": cfg.data_bytes, "tiny_slices": cfg.tiny,
                "MB": MB, "load_average_at_start": os.getloadavg()}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qjam-bench-")))
        saved = {k: os.environ.get(k) for k in ("IPYTHONDIR", "MPLCONFIGDIR")}
        os.environ["IPYTHONDIR"] = str(tmp / "ipython")  # ipyparallel's profile and connection files
        os.environ["MPLCONFIGDIR"] = str(tmp / "mpl")

        @stack.callback
        def _restore() -> None:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

        world = None
        if sshd.available() and groups & {"params", "dataset", "cold"}:
            world = stack.enter_context(SshWorld(tmp / "ssh"))
            log(f"private sshd on {world.world.sshd.address}:{world.world.sshd.port} "
                f"(pid {world.world.sshd.process.pid})")
        elif not sshd.available():
            log("no sshd here: the ssh rows say 'not available' (apt-get install openssh-server)")
        bench = Bench(cfg, groups, res, world)
        if groups & {"trivial", "params", "dataset", "scale"}:
            bench.local_block()
        if groups & {"params", "dataset"}:
            bench.ssh_block()
        bench.data = None
        gc.collect()
        if "cold" in groups:
            bench.cold_block()
        if "scale" in groups:
            bench.scale16_block()
        if "paper" in groups:
            bench.paper_block()
        if "qjam2010" in groups:
            bench.qjam2010_block()
        if "heal" in groups:
            bench.heal_block()
        if "dask" in groups:
            bench.dask_block()
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=None, help="repetitions of every measurement (default 5, "
                        "2 with --quick; the scale row and execnet over ssh take at most 3)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repetitions: checks that everything runs (figures not comparable)")
    parser.add_argument("--only", metavar="ROWS", help=f"comma-separated rows to run: {', '.join(GROUPS)}")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help=f"where run.json and run.png go "
                        f"(default {RESULTS_DIR})")
    parser.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a saved run.json again "
                        "(measures nothing)")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        res = Results(Config(saved["meta"]["repeat"], saved["meta"]["quick"]))
        res.meta, res.extra = saved["meta"], saved.get("extra", {})
        res.rows.update(saved["rows"])
        print_tables(res, evaluate(res))
        return 0
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 5)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    groups = parse_only(args.only)
    cfg = Config(repeat, args.quick)

    main_pid = os.getpid()

    def terminate(signum: int, frame: Any) -> None:  # SIGTERM cleans up as Ctrl-C does
        if os.getpid() != main_pid:  # a forked pool worker inherited this handler: die as by default
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    started = time.perf_counter()
    try:
        res = run(cfg, groups, args.out)
    except KeyboardInterrupt:
        print("interrupted: every cluster, peer and the private sshd were stopped", file=sys.stderr)
        return 130
    res.meta["total_seconds"] = time.perf_counter() - started
    res.meta["load_average_at_end"] = os.getloadavg()
    lines = evaluate(res)
    print_tables(res, lines)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "run.json"
    json_path.write_text(json.dumps({"meta": res.meta, "rows": res.rows, "summary": lines, "extra": res.extra},
                                    indent=1, default=str) + "\n")
    print(f"wrote {json_path}")
    print(f"plot: {plot(lines, args.out / 'run.png', res.meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
