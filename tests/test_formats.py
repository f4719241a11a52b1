"""Sizes are written one way everywhere: ``qjam_nb.formats.format_size``, and nothing else computes one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from qjam_nb.formats import format_ranges, format_size

PACKAGE = Path(__file__).resolve().parent.parent / "qjam_nb"


@pytest.mark.parametrize(("nbytes", "text"), [
    (0, "0 B"),
    (1, "1 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (2**20 - 1, "1.0 MiB"),  # rounds into the next unit: never "1024.0 KiB"
    (2**20, "1.0 MiB"),
    (3 << 20, "3.0 MiB"),
    (12_800_000, "12.2 MiB"),
    (200 * 2**20, "200.0 MiB"),
    (2**30 - 1, "1.0 GiB"),
    (5 * 2**30 + 2**29, "5.5 GiB"),
    (3 * 2**40, "3.0 TiB"),
    (2**50, "1024.0 TiB"),  # the largest unit keeps counting
    (-1536, "-1.5 KiB"),  # a difference of sizes
])
def test_format_size(nbytes, text):
    assert format_size(nbytes) == text


def test_format_ranges():
    assert format_ranges([0, 1, 2, 3, 5, 7, 8]) == "0-3, 5, 7-8"
    assert format_ranges([4, 4, 2]) == "2, 4"
    assert format_ranges([]) == "none"


#: Divisors that turn bytes into a unit. Only qjam_nb/formats.py may divide by them inside an f-string;
#: the worker travels alone (it cannot import formats.py) and writes its one size itself.
UNITS = {2**10, 2**20, 2**30, 2**40, 10**3 * 10**3, 10**9}
UNIT_WORD = re.compile(r" (B|KiB|MiB|GiB|TiB|kB|MB|GB)\b")


#: Files that still write a size by hand, and why.
NOT_YET = {
    # "uploaded 151 KiB to" in SshTransport.describe(): the transport is being reshaped in the same issue
    # (22), and tests/ssh/test_bootstrap.py checks that text; one line for its owner to switch.
    "transport/ssh.py",
}


def _constant(node: ast.AST) -> float | None:
    try:
        value = eval(compile(ast.Expression(node), "<unit>", "eval"), {"__builtins__": {}})  # constants only
    except Exception:
        return None
    return value if isinstance(value, int | float) else None


def sizes_written_by_hand(path: Path) -> list[str]:
    """``line: expression`` for each f-string value that divides by a unit (``n / 2**20``), or is followed by
    a unit's name (``f"{n} MiB"``) without going through ``format_size``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.JoinedStr):
            continue
        for part, after in zip(node.values, [*node.values[1:], None], strict=True):
            if not isinstance(part, ast.FormattedValue):
                continue
            value = part.value
            if isinstance(value, ast.BinOp):
                right = _constant(value.right)
                if (isinstance(value.op, ast.Div | ast.FloorDiv) and right in UNITS) or \
                        (isinstance(value.op, ast.RShift) and right in (10, 20, 30)):
                    found.append(f"{node.lineno}: {ast.unparse(value)}")
                    continue
            by_formatter = isinstance(value, ast.Call) and getattr(value.func, "id", "") == "format_size"
            if isinstance(after, ast.Constant) and UNIT_WORD.match(str(after.value)) and not by_formatter:
                found.append(f"{node.lineno}: {ast.unparse(value)}")
    return found


def test_every_size_shown_to_people_goes_through_format_size():
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] != "worker"
             and p.name != "formats.py" and str(p.relative_to(PACKAGE)) not in NOT_YET]
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in files for line in sizes_written_by_hand(path)]
    assert bad == [], "write sizes with qjam_nb.formats.format_size:\n" + "\n".join(bad)


def test_the_size_checker_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        'a = f"{n / 2**20:.1f} MiB"\nb = f"uploaded {n / 1024:.0f} KiB to"\nc = f"{n >> 20} MiB"\n'
        'd = f"{n} B"\ne = f"{format_size(n)} of slices"\nf = f"{t / 1e3:.1f} s"\ng = f"{x:.1f} ms, {y} Bytes"\n'
    )
    assert [line.split(":")[0] for line in sizes_written_by_hand(sample)] == ["1", "2", "3", "4"]
