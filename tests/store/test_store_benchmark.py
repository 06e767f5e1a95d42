"""benchmarks/store.py keeps running (pstore alone, smallest sizes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_quick_benchmark_runs_and_keeps_the_shared_object_once():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "store.py"), "--quick", "--peers", ""],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=True)
    shared_line = next(line for line in result.stdout.splitlines()
                       if line.startswith("shared once"))
    assert shared_line.split() == ["shared", "once", "True"]
