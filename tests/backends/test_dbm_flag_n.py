"""Flag 'n' on a DBM store: it takes the write lock before it changes anything and empties
the live store in one transaction, with real processes inside transactions and Stores open."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import pstore
from pstore.errors import LockTimeoutError

from .conftest import available_dbm_modules

modules = pytest.mark.parametrize("module", available_dbm_modules())

# Holds a write transaction open until told to commit, then reports.
IN_TRANSACTION = """
import sys
import pstore
with pstore.open(sys.argv[1], "w", backend=sys.argv[2]) as store:
    with store.transaction():
        store["written"] = "in the transaction"
        print("inside", flush=True)
        sys.stdin.readline()
    print("committed", flush=True)
"""


def child(path: str, backend: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", IN_TRANSACTION, path, backend],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert process.stdout.readline() == b"inside\n"
    return process


def finish(process: subprocess.Popen) -> bytes:
    output, _ = process.communicate(b"go\n", timeout=60)
    assert process.returncode == 0
    return output


def filled(tmp_path, backend: str) -> str:
    path = str(tmp_path / "s.db")
    with pstore.open(path, "c", backend=backend) as store:
        store.update({f"k{i}": list(range(i)) for i in range(50)})
    return path


@modules
def test_n_while_another_process_is_in_a_transaction_times_out_and_changes_nothing(
        tmp_path, module):
    backend = f"dbm:{module}"
    path = filled(tmp_path, backend)
    writer = child(path, backend)
    try:
        with pytest.raises(LockTimeoutError, match=f"process {writer.pid} "):
            pstore.open(path, "n", backend=backend, lock_timeout=0.3)
    finally:
        assert finish(writer) == b"committed\n"
    with pstore.open(path, "r", backend=backend) as store:
        assert store["written"] == "in the transaction"
        assert store["k49"] == list(range(49)) and len(store) == 51


@modules
def test_n_waits_for_the_transaction_and_empties_the_store_after_its_commit(tmp_path, module):
    backend = f"dbm:{module}"
    path = filled(tmp_path, backend)
    writer = child(path, backend)
    emptier = subprocess.Popen(
        [sys.executable, "-c", "import sys, pstore\n"
         "pstore.open(sys.argv[1], 'n', backend=sys.argv[2], lock_timeout=60).close()\n"
         "print('emptied', flush=True)", path, backend],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert finish(writer) == b"committed\n"     # never a FileNotFoundError inside it
    assert emptier.communicate(timeout=60)[0] == b"emptied\n"
    with pstore.open(path, "r", backend=backend) as store:
        assert len(store) == 0 and list(store) == []


@modules
def test_an_open_store_sees_the_emptied_store_and_its_later_writes_land(tmp_path, module):
    backend = f"dbm:{module}"
    path = filled(tmp_path, backend)
    with pstore.open(path, "w", backend=backend) as open_store:
        assert open_store["k3"] == [0, 1, 2]
        subprocess.run([sys.executable, "-c", "import sys, pstore\n"
                        "pstore.open(sys.argv[1], 'n', backend=sys.argv[2]).close()",
                        path, backend], check=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert "k3" not in open_store and len(open_store) == 0
        open_store["after"] = "lands in the live store"
    with pstore.open(path, "r", backend=backend) as store:
        assert dict(store) == {"after": "lands in the live store"}


@modules
def test_n_removes_every_blob(tmp_path, module):
    array = pytest.importorskip("numpy").arange(100_000)
    backend = f"dbm:{module}"
    path = str(tmp_path / "s.db")
    with pstore.open(path, "c", backend=backend) as store:
        store["array"] = array
    blobs = [name for _, _, names in os.walk(path + ".blobs") for name in names]
    assert blobs
    pstore.open(path, "n", backend=backend).close()
    assert [name for _, _, names in os.walk(path + ".blobs") for name in names] == []
    with pstore.open(path, "r", backend=backend) as store:
        assert len(store) == 0


def test_n_on_a_foreign_database_replaces_it(tmp_path):
    import dbm.dumb
    path = str(tmp_path / "s.db")
    foreign = dbm.dumb.open(path, "c")
    foreign[b"some"] = b"thing"
    foreign.close()
    with pstore.open(path, "n", backend="dbm:dbm.dumb") as store:
        assert len(store) == 0
        store["k"] = 1
    with pstore.open(path, "r", backend="dbm:dbm.dumb") as store:
        assert dict(store) == {"k": 1}


@pytest.mark.parametrize("damage", ["newer", "garbled"])
def test_n_replaces_a_store_it_cannot_empty(tmp_path, damage):
    path = filled(tmp_path, "dbm:dbm.dumb")
    if damage == "newer":
        from pstore.backends.dbm import DBMBackend
        backend = DBMBackend(path, "w", lock_timeout=5, fsync=False)
        backend.begin()
        backend._put(b"m:version", b"99")
        backend.commit()
        backend.close()
    else:
        with open(path + ".dir", "r+b") as file:
            file.write(b"'\x00(")
    with pstore.open(path, "n", backend="dbm") as store:
        assert len(store) == 0
        store["k"] = 1
    with pstore.open(path, "r", backend="dbm") as store:
        assert dict(store) == {"k": 1}
