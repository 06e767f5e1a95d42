"""The load budget of restricted loading: each hostile pure-data pickle is refused or
loaded within 200 MB, measured in a child process (``resource.getrusage``); a generous
watchdog timeout stands for "it ends" (the child reports its time; nothing asserts it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MEMORY_LIMIT_MB = 200
WATCHDOG_SECONDS = 120

# Each case is Python that sets ``data`` (the hostile pickle) from the names defined in CHILD.
CASES = {
    # 10 M MARKs (10 MB): the stdlib takes 99 MB; one list per mark took 730 MB.
    "ten million marks": "data = b'\\x80\\x04' + b'(' * 10_000_000 + b'.'",
    # A 60-level DAG of shared tuples: 121 bytes whose hash visits 2**61 nodes.
    "DAG in a set": "data = b'\\x80\\x04\\x8f(' + dag(60) + b'\\x90.'",
    "DAG as a dict key": "data = b'\\x80\\x04}' + dag(60) + b'N' + b's.'",
    "DAG in a frozenset": "data = b'\\x80\\x04(' + dag(60) + b'\\x91.'",
    "DAG as a DICT key": "data = b'\\x80\\x04(' + dag(60) + b'Nd.'",
    "DAG through builtins.set": "data = b'\\x80\\x04cbuiltins\\nset\\n' + dag(60)"
                                " + b'\\x85\\x85R.'",
    "DAG through collections.Counter": "data = b'\\x80\\x04ccollections\\nCounter\\n' + dag(60)"
                                       " + b'\\x85\\x85R.'",
    # A key of 2**20 nodes, shared, put into a set a million times: 2**40 node visits.
    "a big key hashed a million times": (
        "data = b'\\x80\\x04\\x8f' + dag(20) + b'\\x94' + b'(' + b'h\\x00' * 1_000_000"
        " + b'\\x90.'"),
}

WORKER = r"""
import json, sys, time
from pstore.engine import restricted_loads

def dag(levels):
    # EMPTY_TUPLE, then DUP TUPLE2 per level: t[i+1] = (t[i], t[i]).
    return b')' + b'2\x86' * levels

%s
start = time.process_time()
try:
    restricted_loads(data)
    outcome = "loaded"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {exc}"[:300]
print(json.dumps({"outcome": outcome, "seconds": time.process_time() - start}))
"""

# Linux keeps the peak RSS of the process image an execve replaced in ru_maxrss, and a
# child spawned from the (large) test process starts as a copy of it: so the worker is
# started by a small launcher, whose RUSAGE_CHILDREN maxrss is then the worker's own peak.
LAUNCHER = r"""
import json, resource, subprocess, sys
worker = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True,
                        check=False)
if worker.returncode:
    sys.exit(worker.stderr)
report = json.loads(worker.stdout)
report["maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(report))
"""


def run_child(case: str, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if mode == "python":
        env["PSTORE_PURE_PYTHON"] = "1"
    completed = subprocess.run([sys.executable, "-c", LAUNCHER, WORKER % CASES[case]], env=env,
                               capture_output=True, text=True, timeout=WATCHDOG_SECONDS,
                               check=False)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@pytest.mark.parametrize("mode", ["c", "python"])
@pytest.mark.parametrize("case", CASES)
def test_a_hostile_pickle_is_refused_within_the_budget(case: str, mode: str) -> None:
    report = run_child(case, mode)
    print(case, mode, report)
    assert report["outcome"].startswith("RestrictedUnpicklingError") or \
        report["outcome"].startswith("UnpicklingError"), report
    assert report["maxrss_mb"] < MEMORY_LIMIT_MB, report
