"""The rows: which exist, what each is titled, its unit and direction, its target, and the run's sizes.

Declarative only (no measuring, no output): ``measure`` fills the rows, ``report`` judges them against
``TARGETS``. A new row goes in ``ROWS`` (and ``TARGETS`` if the issue set one), measured in ``measure.Bench``.
"""

from __future__ import annotations

from .peers.base import DASK, IPP, JOBLIB, MP, PPE, XN, XNSSH

MiB = 1 << 20
MB = 1e6
COLS = 1024  # dataset rows of 1024 float64 (8 KiB)
ALIAS = "bench"
GROUPS = ("trivial", "params", "dataset", "cold", "scale", "paper", "qjam2010", "heal", "dask")
GROUP_ALIASES = {"first": "dataset", "second": "dataset", "hetero": "heal"}


class Config:
    """Sizes and repetitions; ``--quick`` makes everything small (a smoke test, not a measurement)."""

    def __init__(self, repeat: int, quick: bool) -> None:
        self.repeat = repeat
        self.quick = quick
        self.data_bytes = (20 if quick else 200) * MiB
        self.param_bytes = MiB
        self.tiny = 5_000 if quick else 100_000  # slices in the scale row
        self.tiny_least = 200 if quick else 1_000  # a slow peer's fewest slices in the scale row
        self.tiny_rep_seconds = 1.0 if quick else 4.0  # ...else as many as it sends in this time
        self.heavy_repeat = min(repeat, 2 if quick else 3)  # scale row, execnet over ssh with 200 MiB
        self.paper_sizes = (1000,) if quick else (1000, 10000, 100000)
        self.batch_seconds = 0.1 if quick else 0.3  # a batch of calls for the ms-scale rows
        # heal: one of 3 workers slowed HETERO_FACTORS times on cached slices of sleep-work
        self.hetero_slices = 24 if quick else 60
        self.hetero_work = 0.01 if quick else 0.02  # seconds of time.sleep per slice at full speed
        self.hetero_rows = 8 if quick else 32  # rows of COLS float64 a slice: 64 KiB / 256 KiB
        self.hetero_steady = 2 if quick else 3  # calls after the first, their median is the steady state
        self.dask_tiny = 1_000 if quick else 10_000  # one-item slices in the dask rows


# row id -> (group, title, unit, higher is better)
ROWS: dict[str, tuple[str, str, str, bool]] = {
    "trivial": ("trivial", "trivial: x+1 over 2 one-item slices, result back", "ms/call", False),
    "params_local": ("params", "params, local: 1 MiB float64 to each worker, 1 MiB back from each", "ms/iter", False),
    "params_ssh": ("params", "params, ssh: the same to 2 ssh workers", "ms/iter", False),
    "first_local": ("dataset", "dataset first call, local: 200 MiB float64 in 2 slices, shipped and summed", "MB/s",
                    True),
    "first_ssh": ("dataset", "dataset first call, ssh: the same to 2 ssh workers", "MB/s", True),
    "second_local": ("dataset", "dataset second call, local, read-only array (peers have no cache: they re-ship)",
                     "ms", False),
    "second_local_w": ("dataset", "dataset second call, local, writable array (keys hashed again)", "ms", False),
    "second_ssh": ("dataset", "dataset second call, ssh, read-only array", "ms", False),
    "second_ssh_w": ("dataset", "dataset second call, ssh, writable array", "ms", False),
    "cold_local": ("cold", "cold start, local: to 2 ready workers and one round trip", "s", False),
    "cold_ssh": ("cold", "cold start, ssh: the same, worker already uploaded", "s", False),
    "scale_slices": ("scale", "scale: 100,000 tiny slices on local:2, first call, overhead per slice", "us/slice",
                     False),
    "scale_slices_cached": ("scale", "scale: the same 100,000 slices again (cached)", "us/slice", False),
    "scale_16": ("scale", "scale: 16 workers (local:16), ready and answering a no-dataset call", "s", False),
    "paper_1000": ("paper", "qjam's paper: sparse autoencoder, 1k patches, per L-BFGS evaluation", "s/eval", False),
    "paper_10000": ("paper", "qjam's paper: 10k patches", "s/eval", False),
    "paper_100000": ("paper", "qjam's paper: 100k patches", "s/eval", False),
    "qjam2010_1000": ("qjam2010", "qjam 2010's Master.run: its autoencoder, a half per worker, 1k patches", "s/eval",
                      False),
    "qjam2010_10000": ("qjam2010", "qjam 2010's Master.run: 10k patches", "s/eval", False),
    "qjam2010_100000": ("qjam2010", "qjam 2010's Master.run: 100k patches", "s/eval", False),
}
HETERO_FACTORS = (2, 5, 10)
for _f in HETERO_FACTORS:
    ROWS[f"hetero_{_f}x"] = (
        "heal", f"heal, {_f}x: local:3, one worker slowed {_f}x, cached slices of time.sleep work (3 workers share "
        "2 cores), steady state: median of the calls after the first", "s/call", False)
    ROWS[f"hetero_{_f}x_first"] = (
        "heal", f"heal, {_f}x: the same, the first call after the slow-down (it heals within the call)", "s/call",
        False)
IDEAL = "ideal: sum of work / sum of speeds"
# dask (issue 24): qjam_nb on a Dask LocalCluster, plain Dask on the same one, qjam_nb's own local:2 (ondask.py)
ROWS.update({
    "dask_trivial": ("dask", "dask: trivial x+1 over 2 cached one-item slices, result back", "ms/call", False),
    "dask_params": ("dask", "dask: 1 MiB params to 2 cached one-number slices, 1 MiB back from each", "ms/iter",
                    False),
    "dask_first": ("dask", "dask: first call, 200 MiB float64 in 8 slices, shipped and summed", "MB/s", True),
    "dask_second": ("dask", "dask: the same call again, slices cached (plain Dask: on its scattered futures)", "ms",
                    False),
    "dask_tiny": ("dask", "dask: 10,000 one-item slices, first call (shipped)", "us/slice", False),
    "dask_tiny_cached": ("dask", "dask: the same 10,000 slices again (cached)", "us/slice", False),
})
DASK_PLAIN = f"{DASK}, scatter once + map"


PEERS_ALL = [MP, PPE, IPP, DASK, XN, JOBLIB]
TARGETS: list[tuple[str, str, tuple]] = [
    # (row, text, (mode, references, factor)); modes: "ratio" qjam cost <= factor x the reference's cost
    # (reference = the cheapest of those listed), "abs" qjam <= factor in the row's unit,
    # "compute" qjam <= 1.2 x compute + 1 ms, "speedup" numpy time / qjam time >= factor.
    ("trivial", "<= 1.5x execnet popen", ("ratio", [XN], 1.5)),
    ("trivial", "faster than multiprocessing, ipyparallel, dask", ("ratio", [MP, IPP, DASK], 1.0)),
    ("params_local", "<= 2x raw pipe time", ("ratio", ["raw os.pipe echo, 2 children"], 2.0)),
    ("params_ssh", "<= 1.3x raw paramiko time", ("ratio", ["raw paramiko echo, 2 channels"], 1.3)),
    ("first_local", "faster than every peer (joblib included)", ("ratio", PEERS_ALL, 1.0)),
    ("first_ssh", ">= 0.8x raw paramiko, best cipher", ("ratio", ["raw paramiko, best cipher"], 1 / 0.8)),
    ("second_local", "<= 1.2x compute + 1 ms", ("compute",)),
    ("second_local_w", "<= 1.2x compute + 1 ms", ("compute",)),
    ("second_ssh", "<= 1.2x compute + 1 ms", ("compute",)),
    ("second_ssh_w", "<= 1.2x compute + 1 ms", ("compute",)),
    ("cold_local", "<= 2x execnet popen", ("ratio", [XN], 2.0)),
    ("cold_ssh", "no slower than execnet ssh", ("ratio", [XNSSH], 1.0)),
    ("scale_slices", "<= 50 us/slice", ("abs", [], 50.0)),
    ("scale_slices_cached", "<= 50 us/slice", ("abs", [], 50.0)),
    ("scale_16", "ready and answering <= 1 s", ("abs", [], 1.0)),
    ("paper_1000", ">= 1.0x one-process numpy (2 workers)", ("speedup", [], 1.0)),
    ("paper_10000", ">= 1.5x one-process numpy (2 workers)", ("speedup", [], 1.5)),
    ("paper_100000", ">= 1.7x one-process numpy (2 workers)", ("speedup", [], 1.7)),
    ("qjam2010_10000", "2 workers beat one process (>= 1.0x)", ("speedup", [], 1.0)),
    ("qjam2010_100000", "2 workers beat one process (>= 1.0x)", ("speedup", [], 1.0)),
    *[(f"hetero_{f}x{when}", "<= 1.2x ideal", ("ratio", [IDEAL], 1.2))
      for f in HETERO_FACTORS if f >= 5 for when in ("", "_first")],
    # issue 24: on cached data, qjam_nb on a Dask cluster beats plain Dask on the same cluster
    *[(row, "faster than plain Dask (same cluster)", ("ratio", [DASK_PLAIN], 1.0))
      for row in ("dask_trivial", "dask_params", "dask_second", "dask_tiny_cached")],
]
