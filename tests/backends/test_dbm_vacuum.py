"""DBM vacuum by rewriting (dbm.dumb, dbm.ndbm): space given back, readers undisturbed, and
a real SIGKILL at every file operation of it losing nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import pstore
from pstore.backends.dbm_modules import REWRITE_FOLDER, rewrite_pending

from .conftest import available_dbm_modules

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The modules that cannot compact in place, so vacuum rewrites them.
rewritten = pytest.mark.parametrize(
    "module", [name for name in available_dbm_modules() if name in ("dbm.ndbm", "dbm.dumb")])


def expected() -> dict[str, object]:
    return {f"k{number}": {"n": number, "text": "x" * 3000} for number in range(150, 200)} | {
        "shared": [1, 2, 3]}


def fill(path: str, module: str) -> None:
    """A store holding expected(), with the space of 150 deleted values to give back."""
    with pstore.open(path, "n", backend=f"dbm:{module}") as store:
        with store.transaction():
            for number in range(200):
                store[f"k{number}"] = {"n": number, "text": "x" * 3000}
        with store.transaction():
            for number in range(150):
                del store[f"k{number}"]
        store["shared"] = [1, 2, 3]


def contents(path: str, flag: str) -> dict[str, object]:
    with pstore.open(path, flag) as store:
        found = dict(store.items())
        assert store.verify().ok
        return found


def leftovers(path: str) -> list[str]:
    folder = os.path.dirname(path)
    return sorted(name for name in os.listdir(folder) if REWRITE_FOLDER in name)


@rewritten
def test_vacuum_gives_the_space_back_and_keeps_everything(tmp_path, module):
    path = str(tmp_path / "store")
    fill(path, module)
    with pstore.open(path, "r") as reader, pstore.open(path, "w") as writer:
        assert reader["k199"]["n"] == 199     # a handle opened before the vacuum
        freed = writer.vacuum()
        assert freed > 100 * 3000
        assert dict(reader.items()) == expected()
        writer["after"] = "a commit after the vacuum"
        assert reader["after"] == "a commit after the vacuum"
        assert writer.vacuum() < freed  # again: little to give back (one small commit), still whole
    assert contents(path, "r") == {**expected(), "after": "a commit after the vacuum"}
    assert leftovers(path) == []


# Run in a child: kill itself (a real SIGKILL) just before its N-th operation of the given
# kind during the vacuum ("files": creating, renaming, linking, deleting, syncing; "writes":
# opening a file to write, as dbm.dumb does for each entry and its index), or print how many
# there were if it got through.
KILLER = """
import io, os, shutil, signal, sys
import pstore

path, kind, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
operations = 0

def killing(function, counts=lambda *args, **kwargs: True):
    def wrapper(*args, **kwargs):
        global operations
        if counts(*args, **kwargs):
            operations += 1
            if operations == limit:
                os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper

def writing(file, mode="r", *args, **kwargs):
    return any(letter in mode for letter in "wa+x")

with pstore.open(path, "w") as store:
    if kind == "files":
        for name in ("rename", "replace", "link", "unlink", "mkdir", "fsync"):
            setattr(os, name, killing(getattr(os, name)))
        shutil.rmtree = killing(shutil.rmtree)
    else:
        io.open = killing(io.open, writing)
    store.vacuum()
print(operations)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@rewritten
def test_a_vacuum_killed_at_any_file_operation_loses_nothing(tmp_path, module):
    path = str(tmp_path / "store")
    fill(path, module)
    pending_seen = 0
    # Every file operation; every 40th opening to write (dbm.dumb: two per entry).
    for kind, step in [("files", 1), ("writes", 40)]:
        limit = 1
        while True:
            child = subprocess.run([sys.executable, "-c", KILLER, path, kind, str(limit)],
                                   cwd=ROOT, capture_output=True, text=True, timeout=120,
                                   check=False)
            if child.returncode == 0:
                assert int(child.stdout) < limit    # got through: it was killed at each point
                break
            assert child.returncode == -signal.SIGKILL, child.stderr
            # A reader first: it writes nothing, so it sees the files as the kill left them.
            pending_seen += rewrite_pending(path)
            assert contents(path, "r") == expected(), f"killed at {kind} operation {limit}"
            limit += step
    # Some kills left a rewrite past its commit point: the next writer finishes it.
    assert pending_seen > 0
    fill_after = {**expected(), "after": 1}
    with pstore.open(path, "w") as store:
        store["after"] = 1
    assert not rewrite_pending(path)
    assert contents(path, "w") == fill_after
    with pstore.open(path, "w") as store:
        store.vacuum()      # also deletes what the killed ones left half made
    assert leftovers(path) == []
    assert contents(path, "r") == fill_after


READER = """
import os, sys
import pstore

path, stop = sys.argv[1], sys.argv[2]
reads = 0
with pstore.open(path, "r") as store:
    while not os.path.exists(stop):
        assert store["shared"] == [1, 2, 3]
        assert store["k170"]["n"] == 170 and len(store) == 51
        reads += 1
print(reads)
"""


@rewritten
def test_readers_in_another_process_keep_reading_during_vacuums(tmp_path, module):
    path, stop = str(tmp_path / "store"), str(tmp_path / "stop")
    fill(path, module)
    reader = subprocess.Popen([sys.executable, "-c", READER, path, stop], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with pstore.open(path, "w") as store:
            for _ in range(5):
                store.vacuum()
                store["k170"] = {"n": 170, "text": "y"}     # space to give back again
                time.sleep(0.05)
    finally:
        open(stop, "w").close()
        out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert int(out) > 0


@rewritten
def test_a_rewrite_folder_of_another_user_is_never_read(tmp_path, module):
    path = str(tmp_path / "store")
    fill(path, module)
    planted = path + REWRITE_FOLDER
    os.mkdir(planted)
    try:
        os.chown(planted, 54321, -1)
    except PermissionError:
        pytest.skip("only root can give a folder to another user")
    with pytest.raises(pstore.errors.UnsafeFileError, match=r"\.vacuum.*uid 54321"):
        pstore.open(path, "r")
    os.rmdir(planted)
    assert contents(path, "r") == expected()
