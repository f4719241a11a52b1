"""The run judged and shown: each row against its target and the best peer, the detail and summary
tables, the plot, and the versions measured.

Rules: reads ``Results`` only (a saved ``run.json`` prints the same tables again, ``run.py --report``).
"""

from __future__ import annotations

import importlib
import platform
from pathlib import Path

import numpy as np

from .rows import ROWS, TARGETS
from .samples import Results


def cost(value: float, higher_better: bool) -> float:
    """Time-like: lower is better (throughput turned into time per byte)."""
    return 1.0 / value if higher_better else value


def fmt_value(v: float, unit: str) -> str:
    if unit in ("MB/s",):
        return f"{v:.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def fmt_cell(cell: dict, unit: str) -> str:
    if "median" not in cell:
        return cell.get("status") or "-"
    return f"{fmt_value(cell['median'], unit)} ({fmt_value(cell['min'], unit)}-{fmt_value(cell['max'], unit)})"


def speed_words(time_ratio: float) -> str:
    """qjam's time / the other's time, in words."""
    if time_ratio <= 1:
        return f"{1 / time_ratio:.2f}x faster"
    return f"{time_ratio:.2f}x slower"


def find_ref(res: Results, row: str, names: list[str]) -> list[dict]:
    out = []
    for cell in res.rows[row]:
        if "median" in cell and any(cell["system"] == n or cell["system"].startswith(n) for n in names):
            if cell["kind"] in ("ref", "peer"):
                out.append(cell)
    return out


def evaluate(res: Results) -> list[dict]:
    """One summary line per target: qjam's figure, the ratio against the target and against the best peer."""
    lines = []
    for row, text, spec in TARGETS:
        if not res.rows[row]:
            continue
        _, title, unit, hb = ROWS[row]
        q = res.qjam(row)
        line: dict = {"row": row, "target": text, "unit": unit, "qjam": None, "measured": "", "vs_target": None,
                      "met": None, "best_peer": None, "vs_best_peer": None, "peer_ratio_text": ""}
        if q is None:
            status = next((c["status"] for c in res.rows[row] if c["kind"] == "qjam" and c["status"]), "no figure")
            line["measured"] = status
            lines.append(line)
            continue
        qv = q["median"]
        line["qjam"] = qv
        mode = spec[0]
        if mode == "ratio":
            refs = find_ref(res, row, spec[1])
            if refs:
                best = min(refs, key=lambda c: cost(c["median"], hb))
                r = cost(qv, hb) / cost(best["median"], hb)
                line["vs_target"] = r / spec[2]
                shown = qv / best["median"]
                if hb:
                    lim = 1 / spec[2]
                    line["measured"] = f"{shown:.2f}x {best['system']} (need >= {lim:.2f}x)"
                elif spec[2] == 1.0:
                    line["measured"] = f"{speed_words(r)} than {best['system']}"
                else:
                    line["measured"] = f"{shown:.2f}x {best['system']} (need <= {spec[2]:g}x)"
            else:
                line["measured"] = "reference not measured"
        elif mode == "abs":
            line["vs_target"] = qv / spec[2]
            line["measured"] = f"{fmt_value(qv, unit)} {unit} (need <= {spec[2]:g})"
        elif mode == "compute":
            comp = find_ref(res, row, ["pure compute"])
            if comp:
                allowed = 1.2 * comp[0]["median"] + 1.0
                line["vs_target"] = qv / allowed
                line["measured"] = f"{fmt_value(qv, 'ms')} ms vs allowed {allowed:.1f} ms " \
                                   f"(compute {comp[0]['median']:.1f} ms)"
        elif mode == "speedup":
            base = find_ref(res, row, ["one process"])
            if base:
                speedup = base[0]["median"] / qv
                line["vs_target"] = spec[2] / speedup
                line["measured"] = f"{speedup:.2f}x numpy (need >= {spec[2]:g}x)"
                one = next((c for c in res.rows[row] if c["system"] == "one process, 1 thread" and "median" in c),
                           None)
                if one is not None:  # a baseline that other programs on the machine slow down far less
                    line["measured"] += f"; {one['median'] / qv:.2f}x 1-thread numpy"
        if line["vs_target"] is not None:
            line["met"] = line["vs_target"] <= 1.0 if mode != "ratio" or spec[2] != 1.0 else line["vs_target"] < 1.0
        peers = [c for c in res.rows[row] if c["kind"] == "peer" and "median" in c]
        if peers:
            best = min(peers, key=lambda c: cost(c["median"], hb))
            line["best_peer"] = best["system"]
            line["vs_best_peer"] = cost(qv, hb) / cost(best["median"], hb)
            line["peer_ratio_text"] = f"{speed_words(line['vs_best_peer'])} than {best['system']} " \
                                      f"({fmt_value(best['median'], unit)} {unit})"
        lines.append(line)
    return lines


# -- output ------------------------------------------------------------------------------------------------
def detail_table(res: Results) -> str:
    out = []
    for row, cells in res.rows.items():
        if not cells:
            continue
        _, title, unit, hb = ROWS[row]
        out.append(f"{title} [{unit}, {'higher' if hb else 'lower'} is better]")
        q = res.qjam(row)
        width = max(len(c["system"]) for c in cells)
        order = {"qjam": 0, "qjam+": 1, "ref": 2, "peer": 3, "info": 4}
        for c in sorted(cells, key=lambda c: order[c["kind"]]):
            ratio = ""
            if q is not None and "median" in c and c is not q and c["kind"] in ("ref", "peer", "info") \
                    and c["median"] > 0:
                ratio = f"qjam {speed_words(cost(q['median'], hb) / cost(c['median'], hb))}"
            kind = {"qjam": "", "qjam+": "", "ref": "raw", "peer": "peer", "info": "info"}[c["kind"]]
            text = f"  {c['system']:<{width}}  {kind:<4}  {fmt_cell(c, unit):<28}  {ratio:<22}"
            if c.get("note"):
                text += f"  {c['note']}"
            out.append(text.rstrip())
        out.append("")
    return "\n".join(out)


def summary_table(lines: list[dict]) -> str:
    head = ("row", "qjam_nb", "target", "measured", "vs target", "vs best peer")
    body = []
    for ln in lines:
        q = "-" if ln["qjam"] is None else f"{fmt_value(ln['qjam'], ln['unit'])} {ln['unit']}"
        vt = "-" if ln["vs_target"] is None else \
            f"{'met' if ln['met'] else 'MISSED'} ({ln['vs_target']:.2f} of the limit)"
        body.append((ln["row"], q, ln["target"], ln["measured"], vt, ln["peer_ratio_text"] or "-"))
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *[fmt(r) for r in body]])


def plot(lines: list[dict], path: Path, meta: dict) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "not written: matplotlib is not installed (pip install -e '.[bench]')"
    shown = [ln for ln in lines if ln["vs_target"] is not None or ln["vs_best_peer"] is not None]
    if not shown:
        return "not written: nothing to plot"
    labels = [f"{ln['row']}: {ln['target']}" for ln in shown]
    y = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(shown) + 1.8))
    vt = [ln["vs_target"] or np.nan for ln in shown]
    vp = [ln["vs_best_peer"] or np.nan for ln in shown]
    colors = ["tab:green" if ln["met"] else "tab:red" for ln in shown]
    ax.barh(y - 0.2, vt, height=0.38, color=colors, label="qjam_nb / target's limit (green: met)")
    ax.barh(y + 0.2, vp, height=0.38, color="tab:blue", alpha=0.6, label="qjam_nb time / best peer's time")
    for ys, values in ((y - 0.2, vt), (y + 0.2, vp)):
        for yy, v in zip(ys, values, strict=True):
            if v == v:
                ax.text(v, yy, f" {v:.3g}", va="center", fontsize=7)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (time-like: < 1 is better for qjam_nb; throughput rows inverted)")
    ax.set_title(f"qjam_nb benchmark {meta['date']}, {meta['cpus']} CPUs, median of {meta['repeat']}"
                 + (" (QUICK)" if meta["quick"] else ""), fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("qjam_nb", "paramiko", "ipyparallel", "distributed", "execnet", "joblib", "cloudpickle"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:
            out[mod] = "not installed"
    return out


def print_tables(res: Results, lines: list[dict]) -> None:
    cfg = res.cfg
    banner = (f"qjam_nb benchmark, {res.meta['date']}: {res.meta['cpus']} CPUs, Python {res.meta['versions']['python']}"
              f", median (min-max) of {cfg.repeat}{' -- QUICK: small sizes, not a measurement' if cfg.quick else ''}")
    start_load, end_load = res.meta["load_average_at_start"][0], res.meta["load_average_at_end"][0]
    banner += f"\nload average (1 min) {start_load:.2f} at the start, {end_load:.2f} at the end"
    if start_load > 0.5:
        banner += ": other processes were running, so expect noisy figures (BLAS-threaded numpy suffers most)"
    print("\n" + banner + "\n")
    print(detail_table(res))
    print(summary_table(lines))
    print(f"\n{res.meta['total_seconds']:.0f} s in all")
