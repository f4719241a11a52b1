"""The README's first command: ``python -m qjam_nb demo``."""

from __future__ import annotations

import math
import re
import subprocess
import sys


def test_demo_prints_the_square_root_and_the_matrix_sum():
    run = subprocess.run([sys.executable, "-m", "qjam_nb", "demo"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    root = float(re.search(r"sqrt\(123456789\) = ([0-9.]+)", out).group(1))
    assert abs(root - math.sqrt(123456789)) < 1e-6
    ours, numpy = map(float, re.search(r"matrix sum = (-?[0-9.]+) \(numpy: (-?[0-9.]+)\)", out).groups())
    assert ours == numpy
    first, second = re.findall(r"(\S+ \S+) of slices shipped", out)
    assert first.endswith(" MiB") and float(first.split()[0]) > 60 and second == "0 B"
    assert "demo passed" in out


def test_main_without_demo_prints_usage():
    run = subprocess.run([sys.executable, "-m", "qjam_nb"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "usage: python -m qjam_nb demo" in run.stdout
