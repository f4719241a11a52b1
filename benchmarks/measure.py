"""How each row is measured: ``Bench`` runs the workloads on every system, block by block.

A block starts its systems one at a time (2 workers each), warms them, times the selected workloads,
checks every answer, and stops the system before the next starts; the raw limits take turns with
qjam_nb's repetitions, so a drift in the machine's speed hits both.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import inspect
import logging
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from .limits import ParamikoEcho, PipeEcho, SshWorld, pickle_throughput
from .peers.base import DASK, IPP, JOBLIB, MP, PEER_MODULES, PPE, QJAM, XN, XNSSH, System, list_sum
from .peers.dask_distributed import Dask
from .peers.execnet_gateways import Execnet
from .peers.ipp import IPyParallel
from .peers.joblib_loky import Joblib, stop_loky
from .peers.pools import MPPool, PPool
from .peers.qjam import Qjam
from .rows import ALIAS, COLS, MB, Config, MiB
from .samples import Data, Results, batch, log, make_theta


class Bench:
    def __init__(self, cfg: Config, groups: set[str], res: Results, world: SshWorld | None) -> None:
        self.cfg = cfg
        self.groups = groups
        self.res = res
        self.world = world
        self.theta = make_theta(cfg)
        self.data: Data | None = None
        self.installed = {name: mod is None or importlib.util.find_spec(mod) is not None
                          for name, mod in PEER_MODULES.items()}

    def want(self, *groups: str) -> bool:
        return any(g in self.groups for g in groups)

    # -- one system, every workload ----------------------------------------------------------------------
    def run_system(self, make: Callable[[], System], name: str, where: str) -> None:
        """Start one system (2 workers), run the selected workloads on it, stop it."""
        rows = self.rows_of(where)
        if not self.installed.get(name, True):
            for row in rows:
                self.res.add(row, name, "peer", status="not installed")
            return
        log(f"-- {name}")
        system: System | None = None
        t0 = time.perf_counter()
        try:
            system = make()
            log(f"   started in {time.perf_counter() - t0:.1f} s")
            if self.want("trivial") and where == "local":
                self.trivial(system)
            if self.want("params"):
                self.params(system, where)
            if self.want("dataset"):
                self.dataset(system, where)
            if self.want("scale") and where == "local":
                self.scale(system)
        except Exception as exc:  # one peer failing leaves the others to run
            traceback.print_exc()
            for row in rows:
                if not any(c["system"] == name for c in self.res.rows[row]):
                    self.res.add(row, name, "qjam" if name == QJAM else "peer",
                                 status=f"failed: {type(exc).__name__}: {exc}"[:200])
        finally:
            if system is not None:
                t1 = time.perf_counter()
                system.close()
                log(f"   stopped in {time.perf_counter() - t1:.1f} s")
            gc.collect()

    def rows_of(self, where: str) -> list[str]:
        rows = []
        if self.want("trivial") and where == "local":
            rows.append("trivial")
        if self.want("params"):
            rows.append(f"params_{where}")
        if self.want("dataset"):
            rows += [f"first_{where}", f"second_{where}", f"second_{where}_w"]
        if self.want("scale") and where == "local":
            rows += ["scale_slices", "scale_slices_cached"]
        return rows

    def trivial(self, s: System) -> None:
        if s.trivial() != [2, 3]:
            raise RuntimeError(f"{s.name}: trivial gave {s.trivial()!r}")
        samples = [batch(s.trivial, self.cfg.batch_seconds) * 1e3 for _ in range(self.cfg.repeat)]
        self.res.add("trivial", s.name, s.kind, samples)
        log(f"   trivial {statistics.median(samples):.2f} ms/call")

    def params(self, s: System, where: str) -> None:
        row = f"params_{where}"
        theta = self.theta
        got = s.params(theta)
        if not np.array_equal(got, 2 * (theta + 1.0)):
            raise RuntimeError(f"{s.name}: params gave a wrong vector")
        echo: PipeEcho | ParamikoEcho | None = None
        ref, ref_name, samples, ref_samples = None, "", [], []
        transport = None
        try:
            if s.kind == "qjam":  # the raw reference takes turns with qjam_nb, one batch each
                if where == "local":
                    echo, ref_name = PipeEcho(theta.nbytes), "raw os.pipe echo, 2 children"
                else:
                    transport = self.world.transport()
                    echo, ref_name = ParamikoEcho(transport, theta.nbytes, sys.executable), \
                        "raw paramiko echo, 2 channels"
                ref = memoryview(theta).cast("B")
                echo.round_trip(ref)
            for _ in range(self.cfg.repeat):
                if echo is not None:
                    ref_samples.append(batch(lambda: echo.round_trip(ref), self.cfg.batch_seconds) * 1e3)
                samples.append(batch(lambda: s.params(theta), self.cfg.batch_seconds) * 1e3)
        finally:
            if echo is not None:
                echo.close()
            if transport is not None:
                transport.close()
        if ref_samples:
            self.res.add(row, ref_name, "ref", ref_samples,
                         "1 MiB to each child and back, store and forward" +
                         (", 1 MiB pipe buffers" if where == "local" else ", python echo on the sshd"))
        self.res.add(row, s.name, s.kind, samples)
        log(f"   params {statistics.median(samples):.2f} ms/iter"
            + (f" (raw {statistics.median(ref_samples):.2f})" if ref_samples else ""))

    def dataset(self, s: System, where: str) -> None:
        cfg = self.cfg
        if self.data is None:
            self.data = Data(cfg)
        data, h = self.data, self.data.h
        nbytes = data.base.nbytes
        f = s.dataset_fraction
        reps = cfg.heavy_repeat if f > 1 else cfg.repeat
        first, second, second_w, kept = [], [], [], []
        for rep in range(reps):
            x = data.fresh(rep + (100 if where == "ssh" else 0))
            if f > 1:  # the first 1/f of both halves' rows, as two slices
                h = data.h // f
                x = x[: 2 * h]
                nbytes = x.nbytes
            expect = x[:h].sum() + x[h:].sum()
            if s.kind == "qjam":
                self.references(x, h, where)
            t0 = time.perf_counter()
            got1 = s.dataset(x, h)
            first.append(nbytes / (time.perf_counter() - t0) / MB)
            if s.kind == "qjam":
                record = s.cluster.last_call  # the time inside map (no observer of our own: it would cost per event)
                if record is not None and record.ok:
                    self.res.extra.setdefault(f"first_{where}_in_call_s", []).append(record.seconds)
                calls = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    got2 = s.dataset(x, h)
                    calls.append(time.perf_counter() - t0)
                second.append(statistics.median(calls) * 1e3)
                x.setflags(write=True)
                calls = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    got3 = s.dataset(x, h)
                    calls.append(time.perf_counter() - t0)
                second_w.append(statistics.median(calls) * 1e3)
                if not (np.isclose(got2, expect, rtol=1e-12) and np.isclose(got3, expect, rtol=1e-12)):
                    raise RuntimeError(f"{s.name}: cached sums {got2!r} {got3!r}, expected {expect!r}")
            else:
                keep = isinstance(s, Dask)
                t0 = time.perf_counter()
                got2 = s.dataset(x, h, keep=True) if keep else s.dataset(x, h)
                second.append((time.perf_counter() - t0) * 1e3 * f)
                if keep:
                    t0 = time.perf_counter()
                    got3 = s.dataset_kept()
                    kept.append((time.perf_counter() - t0) * 1e3)
                    s.kept = []
                    if not np.isclose(got3, expect, rtol=1e-12):
                        raise RuntimeError(f"{s.name}: kept sum {got3!r}, expected {expect!r}")
            if not np.isclose(got1, expect, rtol=1e-12) or not np.isclose(got2, expect, rtol=1e-12):
                raise RuntimeError(f"{s.name}: sums {got1!r} {got2!r}, expected {expect!r}")
            del x
            gc.collect()
            log(f"   dataset rep {rep + 1}/{reps}: first {first[-1]:.0f} MB/s, second {second[-1]:.1f} ms"
                + (f", writable {second_w[-1]:.1f} ms" if second_w else "")
                + (f", dask on kept futures {kept[-1]:.1f} ms" if kept else ""))
        from qjam_nb.formats import format_size

        full = format_size(data.base.nbytes)
        small = f"; measured on {format_size(nbytes)} (ssh -C compresses: too slow for {full})" if f > 1 else ""
        self.res.add(f"first_{where}", s.name, s.kind, first, small.lstrip("; "))
        self.res.add(f"second_{where}", s.name, s.kind, second,
                     s.second_note + (small + f", times {f} for {full}" if f > 1 else ""))
        if s.kind == "qjam":
            self.res.add(f"second_{where}_w", s.name, s.kind, second_w, "every slice hashed again")
        else:
            self.res.add(f"second_{where}_w", s.name, s.kind, second, "as the read-only row: " + s.second_note)
        if kept:
            for row in (f"second_{where}", f"second_{where}_w"):
                self.res.add(row, f"{DASK}, scattered futures kept", "info", kept,
                             "dask's own way to keep data on the workers (not the same API as a re-shipped call)")

    def references(self, x: np.ndarray, h: int, where: str) -> None:
        """The raw limits of a repetition of the dataset row, measured right before qjam_nb's call."""
        import ssh_transfer

        nbytes = x.nbytes
        for _ in range(3):  # the pure compute of the second call: the two sums here
            t0 = time.perf_counter()
            _ = x[:h].sum() + x[h:].sum()
            self.res.extra.setdefault(f"compute_{where}_ms", []).append((time.perf_counter() - t0) * 1e3)
        raw = memoryview(x).cast("B")
        if where == "local":
            for key, kw in (("pipe_1MiB", {"pipe_size": MiB}), ("pipe_64KiB", {}), ("pipe_2x", {"pipes": 2})):
                part = raw[: nbytes // 2] if key == "pipe_2x" else raw
                secs = ssh_transfer.pipe_send(part, **kw)
                self.res.extra.setdefault(key, []).append(nbytes / secs / MB)
            d, lo = pickle_throughput(x, h)
            self.res.extra.setdefault("pickle_dumps", []).append(d)
            self.res.extra.setdefault("pickle_loads", []).append(lo)
        else:
            t = self.raw_ssh.get(self.best_cipher)
            secs = ssh_transfer.raw_send(t, raw[: nbytes // 2], 2)
            self.res.extra.setdefault("paramiko_best", []).append(nbytes / secs / MB)
            t = self.raw_ssh.get("qjam")
            secs = ssh_transfer.raw_send(t, raw[: nbytes // 2], 2)
            self.res.extra.setdefault("paramiko_qjam", []).append(nbytes / secs / MB)

    def tiny_for(self, s: System) -> int:
        """How many tiny slices a peer gets in the scale row: all of them, unless a probe of a few
        hundred says that would take over ``tiny_rep_seconds`` a repetition (dask and ipyparallel
        take ~1-6 ms a task here, ProcessPoolExecutor ~0.1-0.3 ms)."""
        cfg = self.cfg
        probe = list(range(cfg.tiny_least // 5))
        t0 = time.perf_counter()
        if s.tiny(probe) != sum(probe):
            raise RuntimeError(f"{s.name}: the probe's tiny slices summed to the wrong value")
        per_slice = (time.perf_counter() - t0) / len(probe)
        return max(cfg.tiny_least, min(cfg.tiny, int(cfg.tiny_rep_seconds / per_slice)))

    def scale(self, s: System) -> None:
        cfg = self.cfg
        n = cfg.tiny if s.kind == "qjam" else self.tiny_for(s)
        first, cached, per_task = [], [], []
        for rep in range(cfg.heavy_repeat):
            items = list(range(rep * n, (rep + 1) * n))
            expect = sum(items)
            t0 = time.perf_counter()
            got = s.tiny(items)
            first.append((time.perf_counter() - t0) / n * 1e6)
            if got != expect:
                raise RuntimeError(f"{s.name}: {n} tiny slices summed to {got}, not {expect}")
            if s.kind == "qjam":
                t0 = time.perf_counter()
                got = s.tiny(items)
                cached.append((time.perf_counter() - t0) / n * 1e6)
                if got != expect:
                    raise RuntimeError(f"{s.name}: cached tiny slices summed to {got}, not {expect}")
            if isinstance(s, MPPool):  # the same pool one task per slice, as qjam_nb and the others send them
                t0 = time.perf_counter()
                got = sum(s.pool.map(list_sum, [[i] for i in items], chunksize=1))
                per_task.append((time.perf_counter() - t0) / n * 1e6)
                if got != expect:
                    raise RuntimeError(f"{s.name}: chunksize=1 gave {got}, not {expect}")
            log(f"   scale rep {rep + 1}: {n} slices, first {first[-1]:.1f} us/slice"
                + (f", cached {cached[-1]:.1f} us/slice" if cached else ""))
            del items
        note = s.tiny_note + ("" if n == cfg.tiny else f"; {n:,} slices (fewer: ~{first[0]:.0f} us a task, "
                              "and the run is kept short)")
        self.res.add("scale_slices", s.name, s.kind, first, note)
        if per_task:
            for row in ("scale_slices", "scale_slices_cached"):
                self.res.add(row, f"{MP}, chunksize=1", "info", per_task, "one task per slice, as qjam_nb sends them")
        if cached:
            self.res.add("scale_slices_cached", s.name, s.kind, cached, "every slice cached: only TASKs travel")
        else:
            self.res.add("scale_slices_cached", s.name, s.kind, first, "no cache: " + note)

    # -- blocks -------------------------------------------------------------------------------------------
    def local_block(self) -> None:
        self.run_system(lambda: self.warm(Qjam(["local:2"], f"{QJAM} local:2")), QJAM, "local")
        peers: list[tuple[str, Callable[[], System]]] = [
            (XN, lambda: Execnet(f"popen//python={sys.executable}", XN)),
            (MP, MPPool), (PPE, PPool), (JOBLIB, Joblib), (DASK, Dask), (IPP, IPyParallel),
        ]
        for name, make in peers:
            self.run_system(lambda make=make: self.warm(make()), name, "local")
        self.reference_rows("local")

    def warm(self, s: System) -> System:
        """Not timed: the workers import numpy, see each function once."""
        s.round_trip()
        s.trivial()
        s.params(self.theta)
        warm = np.arange(2.0 * COLS).reshape(2, COLS)
        if s.dataset(warm, 1) != warm.sum():
            raise RuntimeError(f"{s.name}: wrong warm-up sum")
        return s

    def ssh_block(self) -> None:
        if not self.want("params", "dataset"):
            return
        if self.world is None:
            for row in ("params_ssh", "first_ssh", "second_ssh", "second_ssh_w"):
                self.res.add(row, QJAM, "qjam", status="not available: no sshd (apt-get install openssh-server)")
            return
        self.raw_ssh: dict[str, Any] = {}
        try:
            if self.want("dataset"):
                self.cipher_sweep()
            self.run_system(lambda: self.warm(Qjam([f"{ALIAS}:2"], f"{QJAM} ssh {ALIAS}:2")), QJAM, "ssh")
        finally:
            for t in self.raw_ssh.values():
                t.close()
            self.raw_ssh = {}
        self.run_system(lambda: self.warm(Execnet(self.world.execnet_spec(), XNSSH)), XNSSH, "ssh")
        self.reference_rows("ssh")

    def cipher_sweep(self) -> None:
        """Raw paramiko throughput (2 channels x half the dataset) with each cipher both sides offer."""
        import ssh_transfer

        payload = memoryview(np.random.default_rng(2).random(self.cfg.data_bytes // 16)).cast("B")
        qjam_t = self.world.transport()
        self.raw_ssh["qjam"] = qjam_t
        sweep: dict[str, float] = {}
        import paramiko

        quiet = logging.getLogger("paramiko")
        level = quiet.level
        for cipher in paramiko.Transport._preferred_ciphers:
            quiet.setLevel(logging.CRITICAL)  # a refused cipher is logged with a traceback otherwise
            try:
                t = self.world.transport(cipher)
            except Exception as exc:  # the server does not offer it
                sweep[cipher] = float("nan")
                log(f"   cipher {cipher}: not offered ({type(exc).__name__})")
                continue
            finally:
                quiet.setLevel(level)
            try:
                ssh_transfer.raw_send(t, payload[: 8 * MiB], 2)
                secs = min(ssh_transfer.raw_send(t, payload, 2) for _ in range(2))
                sweep[cipher] = 2 * len(payload) / secs / MB
                log(f"   cipher {cipher}: {sweep[cipher]:.0f} MB/s (2 channels)")
                self.raw_ssh[cipher] = t
            except Exception:
                t.close()
                raise
        offered = {c: v for c, v in sweep.items() if v == v}
        self.best_cipher = max(offered, key=offered.get)
        for c in list(self.raw_ssh):
            if c not in ("qjam", self.best_cipher):
                self.raw_ssh.pop(c).close()
        ssh_transfer.raw_send(qjam_t, payload[: 8 * MiB], 2)
        self.res.extra["cipher_sweep_MBps"] = sweep
        self.res.extra["best_cipher"] = self.best_cipher
        self.res.extra["qjam_cipher"] = qjam_t.local_cipher
        log(f"   best cipher {self.best_cipher}; qjam_nb's choice {qjam_t.local_cipher}")

    def reference_rows(self, where: str) -> None:
        """Raw limits and compute, gathered during qjam_nb's repetitions, into their rows."""
        ex = self.res.extra
        if not self.want("dataset") or f"compute_{where}_ms" not in ex:
            return
        r = f"first_{where}"
        if where == "local":
            self.res.add(r, "raw os.pipe, 1 MiB buffer", "ref", ex["pipe_1MiB"],
                         "all 200 MiB into one pipe, a child reads and discards (F_SETPIPE_SZ as qjam's)")
            self.res.add(r, "raw os.pipe, 64 KiB buffer", "info", ex["pipe_64KiB"], "Linux's default pipe size")
            self.res.add(r, "raw os.pipe, 2 children at once", "info", ex["pipe_2x"], "100 MiB each")
            self.res.add(r, "pickle 5 dumps (in-band)", "ref", ex["pickle_dumps"], "both slices, in this process")
            self.res.add(r, "pickle 5 loads (in-band)", "ref", ex["pickle_loads"], "both slices, in this process")
        else:
            sweep = ex.get("cipher_sweep_MBps", {})
            self.res.add(r, f"raw paramiko, best cipher {ex['best_cipher']}", "ref", ex["paramiko_best"],
                         "2 channels x 100 MiB into cat; sweep: "
                         + ", ".join(f"{c} {v:.0f}" for c, v in sweep.items() if v == v))
            if ex["best_cipher"] != ex["qjam_cipher"]:
                self.res.add(r, f"raw paramiko, qjam_nb's cipher {ex['qjam_cipher']}", "info", ex["paramiko_qjam"],
                             "the same transfer with the cipher qjam_nb negotiates")
        in_call = ex.get(f"first_{where}_in_call_s")
        if in_call:
            nbytes = self.data.base.nbytes
            self.res.add(r, f"{QJAM}, CallStarted to CallFinished", "qjam+", [nbytes / s / MB for s in in_call],
                         "the same first calls without the slice hashing before CallStarted")
        for row in (f"second_{where}", f"second_{where}_w"):
            self.res.add(row, "pure compute: the two sums here", "ref", ex[f"compute_{where}_ms"],
                         "x[:h].sum() + x[h:].sum() in this process")

    def cold_block(self) -> None:
        """Start to 2 ready workers plus one round trip, then stop (not timed); systems take turns."""
        systems: list[tuple[str, str, str, Callable[[], System]]] = [
            ("cold_local", f"{QJAM} local:2", QJAM, lambda: Qjam(["local:2"], f"{QJAM} local:2")),
            ("cold_local", XN, XN, lambda: Execnet(f"popen//python={sys.executable}", XN)),
            ("cold_local", MP, MP, MPPool),
            ("cold_local", PPE, PPE, PPool),
            ("cold_local", JOBLIB, JOBLIB, Joblib),
            ("cold_local", DASK, DASK, Dask),
            ("cold_local", IPP, IPP, IPyParallel),
        ]
        if self.world is not None:
            systems += [
                ("cold_ssh", f"{QJAM} ssh {ALIAS}:2", QJAM, lambda: Qjam([f"{ALIAS}:2"], f"{QJAM} ssh")),
                ("cold_ssh", XNSSH, XNSSH, lambda: Execnet(self.world.execnet_spec(), XNSSH)),
            ]
            # The worker is uploaded (and the ssh client's known host seen) once, untimed.
            Qjam([f"{ALIAS}:2"], "upload").close()
        else:
            self.res.add("cold_ssh", QJAM, "qjam", status="not available: no sshd")
        log("-- cold start")
        times: dict[str, list[float]] = {}
        ready: dict[str, list[float]] = {}
        failed: dict[str, str] = {}
        for rep in range(self.cfg.repeat):
            for _row, label, name, make in systems:
                if not self.installed.get(name, True) or label in failed:
                    continue
                if name == JOBLIB:
                    stop_loky()
                s = None
                try:
                    t0 = time.perf_counter()
                    s = make()
                    t1 = time.perf_counter()
                    s.round_trip()
                    t2 = time.perf_counter()
                    times.setdefault(label, []).append(t2 - t0)
                    ready.setdefault(label, []).append(t1 - t0)
                except Exception as exc:
                    traceback.print_exc()
                    failed[label] = f"failed: {type(exc).__name__}: {exc}"[:200]
                finally:
                    if s is not None:
                        s.close()
                    gc.collect()
            log(f"   rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v))
        for row, label, name, _ in systems:
            kind = "qjam" if name == QJAM else "peer"
            if not self.installed.get(name, True):
                self.res.add(row, label, kind, status="not installed")
            elif label in failed:
                self.res.add(row, label, kind, status=failed[label])
            else:
                note = {JOBLIB: "loky starts its workers on the first call",
                        PPE: "workers start on the first submit, counted here",
                        MP: f"start method {__import__('multiprocessing').get_start_method()}"}.get(name, "")
                self.res.add(row, label, kind, times[label], note)
                if name == QJAM:
                    self.res.add(row, f"{label}, ready only", "qjam+", ready[label],
                                 "Cluster(...) returned: workers started and handshaken")

    def scale16_block(self) -> None:
        log("-- 16 workers")
        cfg = self.cfg
        entries: dict[str, dict[str, list[float]]] = {}
        makers: list[tuple[str, Callable[[], System]]] = [
            (f"{QJAM} local:16", lambda: Qjam(["local:16"], f"{QJAM} local:16")),
            (f"{MP}(16)", lambda: MPPool(16)),
            (f"{XN} x 16", lambda: Execnet(f"popen//python={sys.executable}", XN, 16)),
        ]
        for rep in range(cfg.repeat):
            for label, make in makers:
                if label.startswith(XN) and not self.installed[XN]:
                    continue
                s = None
                try:
                    t0 = time.perf_counter()
                    s = make()
                    t1 = time.perf_counter()
                    got = s.round_trip()
                    t2 = time.perf_counter()
                    s.round_trip()
                    t3 = time.perf_counter()
                    if (sum(got) if isinstance(got, list) else got) != 16:
                        raise RuntimeError(f"{label}: the round trip gave {got!r}")
                finally:
                    if s is not None:
                        s.close()
                    gc.collect()
                e = entries.setdefault(label, {"total": [], "ready": [], "call": [], "again": []})
                e["total"].append(t2 - t0)
                e["ready"].append(t1 - t0)
                e["call"].append(t2 - t1)
                e["again"].append(t3 - t2)
            log(f"   rep {rep + 1}: " + ", ".join(
                f"{k} ready {v['ready'][-1]:.2f} s + call {v['call'][-1] * 1e3:.0f} ms" for k, v in entries.items()))
        for label, e in entries.items():
            q = label.startswith(QJAM)
            self.res.add("scale_16", label, "qjam" if q else "peer", e["total"], "ready + first call")
            self.res.add("scale_16", f"{label}: ready", "qjam+" if q else "info", e["ready"])
            self.res.add("scale_16", f"{label}: first call", "qjam+" if q else "info", e["call"])
            self.res.add("scale_16", f"{label}: next call", "qjam+" if q else "info", e["again"])
        if not self.installed[XN]:
            self.res.add("scale_16", f"{XN} x 16", "peer", status="not installed")

    def paper_block(self) -> None:
        log("-- qjam's paper: sparse autoencoder (benchmarks/sparse_autoencoder.py)")
        rows = [f"paper_{n}" for n in (1000, 10000, 100000)]
        try:
            module = importlib.import_module("sparse_autoencoder")
            measure = module.measure
        except Exception as exc:
            for row in rows:
                self.res.add(row, QJAM, "qjam", status=f"not available: {type(exc).__name__}: {exc}"[:200])
            return
        kwargs: dict[str, Any] = {"sizes": self.cfg.paper_sizes}
        params = inspect.signature(measure).parameters
        if "evals" in params and self.cfg.quick:  # otherwise measure()'s own number of evaluations
            kwargs["evals"] = 3
        if "verbose" in params:
            kwargs["verbose"] = True
        try:
            out = measure(None, **kwargs)
        except Exception as exc:
            traceback.print_exc()
            for row in rows:
                self.res.add(row, QJAM, "qjam", status=f"not available: {type(exc).__name__}: {exc}"[:200])
            return
        self.res.extra["paper"] = {k: v for k, v in out.items() if k != "rows"}
        reported = out.get("qjam", {})
        for n, cells in out.get("rows", {}).items():
            row = f"paper_{int(n)}"
            if row not in self.res.rows:
                continue
            baseline = getattr(module, "ONE_PROCESS", "numpy")
            for name, st in cells.items():
                if name in (baseline, "numpy"):
                    kind, label, note = "ref", "one process, numpy (default threads)", "cost_and_grad in this process"
                elif name == getattr(module, "RAW_PIPES", None):
                    kind, label, note = "info", "raw pipes, 2 processes (the floor)", \
                        "slice_sums in 2 children fed bytes over pipes, no framework"
                elif name.endswith(("worker", "workers")):
                    kind = "qjam" if name == "2 workers" else "qjam+"
                    label, note = f"{QJAM} local, {name}", "one cluster.map per evaluation, BLAS 1 thread per worker"
                else:
                    kind, label, note = "info", name, "see benchmarks/sparse_autoencoder.py"
                self.res.add(row, label, kind, st["samples"], note)
            busy = (out.get("others_busy") or {}).get(n)
            slices = (out.get("slices") or {}).get(n)
            if busy is not None or slices:
                self.res.rows[row].append({
                    "system": "conditions", "kind": "info", "status": "",
                    "note": (f"{slices[0]} slices of {slices[1]} rows; " if slices else "")
                    + (f"CPU used by other programs meanwhile: {busy:.2f} cores" if busy is not None else "")})
            q = reported.get(n) or reported.get(str(n))
            if q:
                self.res.extra.setdefault("paper_qjam_2010", {})[row] = q
                self.res.rows[row].append({"system": "qjam (2010 report): 1 worker / 2 workers", "kind": "info",
                                           "note": f"{q[0]} s / {q[1]} s per evaluation", "status": ""})
        for row in rows:
            if not self.res.rows[row]:
                self.res.add(row, QJAM, "qjam", status="not measured (--quick)")

    def heal_block(self) -> None:
        """One of 3 workers slowed 2x, 5x, 10x on cached data: qjam_nb, the ideal, dask (``heal.py``)."""
        from .heal import Heal

        Heal(self.cfg, self.res, self.installed).run()

    def dask_block(self) -> None:
        """qjam_nb on a Dask LocalCluster, plain Dask on the same one, qjam_nb's own local:2 (``ondask.py``)."""
        from .ondask import DaskRows

        DaskRows(self.cfg, self.res, self.installed).run()

    def qjam2010_block(self) -> None:
        log("-- qjam 2010's Master.run: its autoencoder on local:2 (benchmarks/qjam2010_autoencoder.py)")
        rows = [f"qjam2010_{n}" for n in (1000, 10000, 100000)]
        try:
            module = importlib.import_module("qjam2010_autoencoder")
            out = module.measure(self.cfg.paper_sizes, 3 if self.cfg.quick else None, verbose=True)
        except Exception as exc:
            traceback.print_exc()
            for row in rows:
                self.res.add(row, QJAM, "qjam", status=f"not available: {type(exc).__name__}: {exc}"[:200])
            return
        self.res.extra["qjam2010_blas"] = out.get("blas", {})
        kinds = {module.ONE_PROCESS: ("ref", "cost_and_grad of all the patches in this process"),
                 module.SET: ("qjam", "one mapfunc call per worker on its half; BLAS threads: a core's share each"),
                 module.LEFT: ("qjam+", "the same, workers' BLAS threads left to numpy (as many as cores)")}
        for n, cells in out["rows"].items():
            row = f"qjam2010_{int(n)}"
            for name, st in cells.items():
                kind, note = kinds[name]
                self.res.add(row, name if kind != "qjam" else f"{QJAM} {name}", kind, st["samples"], note)
        for row in rows:
            if not self.res.rows[row]:
                self.res.add(row, QJAM, "qjam", status="not measured (--quick)")
