"""A writer of array transactions SIGKILLed at random moments never leaves a record
naming a missing or partial blob (issue 6): real processes, real files, every backend."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import pstore
from pstore.backends.blobs import blob_digest

KILLS = 12
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def blob_files(path: str) -> dict[str, str]:
    """name -> file of every blob, and the temporary files under the name '.tmp'."""
    directory = path + ".blobs"
    found = {}
    for entry in os.listdir(directory):
        if entry.startswith(".tmp"):
            found.setdefault(".tmp", entry)
        else:
            for name in os.listdir(os.path.join(directory, entry)):
                found[name] = os.path.join(directory, entry, name)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_array_writer_never_leaves_a_dangling_or_partial_blob(path, backend_name):
    rng = random.Random(backend_name)
    acknowledged = 0
    cut_writes = 0      # kills that cut a blob's write short (left a temporary file)
    for _ in range(KILLS):
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.store.store_workers", backend_name, path, "arrays"],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        first = child.stdout.readline()
        assert first, "the writer died on its own"
        time.sleep(rng.uniform(0, 0.1))   # lands anywhere in a transaction or a gc
        child.send_signal(signal.SIGKILL)
        child.wait()
        lines = [first, *child.stdout.read().splitlines()]
        child.stdout.close()
        acknowledged = max(acknowledged, *(int(line) for line in lines if line.strip()))

        # Every blob file under a name holds exactly the bytes of that name.
        found = blob_files(path)
        cut_writes += ".tmp" in found
        for name, file in found.items():
            if name != ".tmp":
                with open(file, "rb") as handle:
                    assert blob_digest(handle.read()) == name, f"partial blob {file}"
        with pstore.open(path, "w", backend=backend_name) as store:
            # All or nothing, acknowledged commits kept, and every blob a record names loads.
            labels, features, same = store["labels"], store["features"], store["same"]
            i = int(labels[0])
            assert i >= acknowledged and same["i"] == i
            np.testing.assert_array_equal(labels, np.full(50_000, i))
            np.testing.assert_array_equal(features, np.full(200_000, float(i)))
            np.testing.assert_array_equal(same["array"], np.arange(100_000))
            del labels, features, same
            store.gc()
            # After gc: exactly the three blobs the keys use, nothing temporary.
            assert len(blob_files(path)) == 3
    print(f"{cut_writes} of {KILLS} kills cut a blob's write short")
