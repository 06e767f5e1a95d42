"""The DBM backend under SIGKILL: real processes, real files, killed at random moments.

A child commits transactions in a loop (two keys and a list updated together) and
prints each value once its commit returned; the parent kills it at a random
moment, reopens the store, and checks that the last transaction is all or nothing
and that every acknowledged commit is there. The journal's recovery paths are
also driven directly, so that each one is exercised on every run.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

import pstore
from pstore.backends import journal
from pstore.backends.dbm import DBMBackend

from .conftest import available_dbm_modules

KILLS = 25
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

modules = pytest.mark.parametrize("module", available_dbm_modules())


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@modules
def test_killed_writer_leaves_every_transaction_all_or_nothing(tmp_path, module):
    path = str(tmp_path / "store.db")
    backend = f"dbm:{module}"
    rng = random.Random(module)
    acknowledged = 0
    journals_found = 0
    applies_cut = 0     # dbm.dumb only: killed while applying (its index copy still there)
    started = time.monotonic()
    for _ in range(KILLS):
        # The same writer as the store's kill test: 'a', 'big' and 'b' updated together.
        child = subprocess.Popen([sys.executable, "-m", "tests.store.store_workers", backend, path],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)
        first = child.stdout.readline()
        assert first, "the writer died on its own"
        # Past its first commit the child spends its time committing, so a random
        # delay lands anywhere in the commit: buffering, journal, apply, cleanup.
        time.sleep(rng.uniform(0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait()
        lines = [first, *child.stdout.read().splitlines()]
        child.stdout.close()
        acknowledged = max(acknowledged, *(int(line) for line in lines if line.strip()))
        journals_found += os.path.exists(path + ".journal")
        applies_cut += os.path.exists(path + ".dir.saved")
        with pstore.open(path, "w", backend=backend) as store:
            a, b = store["a"], store["b"]
            assert a == b and store["big"] == [a] * 1000
            assert acknowledged <= a <= acknowledged + 1
            acknowledged = a
    elapsed = time.monotonic() - started
    print(f"{module}: {KILLS} kills, last value {acknowledged}, a journal was left by "
          f"{journals_found} kills ({applies_cut} during dbm.dumb's apply), {elapsed:.1f} s")
    assert elapsed < 60


def files_with_times(folder: str) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as file:
                found[full] = (file.read(), os.stat(full).st_mtime_ns)
    return found


def fill(path: str, module: str) -> DBMBackend:
    backend = DBMBackend(path, "c", lock_timeout=5, fsync=False, variant=module)
    backend.begin()
    oid = backend.new_oid()
    backend.put_record(oid, b"old", ())
    backend.bind_key("k", oid)
    backend.commit()
    return backend


def journal_of_a_rewrite(backend: DBMBackend) -> dict:
    """The changes of a transaction that rewrites the record of "k", rolled back."""
    backend.begin()
    oid = backend.get_key("k")
    backend.put_record(oid, b"new", ())
    backend.bind_key("other", oid)
    backend._flush_pages()      # what commit() does first
    backend._seal(backend.database.changes)
    changes = dict(backend.database.changes)
    backend.rollback()
    return changes


@modules
def test_complete_journal_is_read_by_a_reader_and_replayed_by_the_next_writer(tmp_path, module):
    path = str(tmp_path / "store.db")
    writer = fill(path, module)
    journal.write(path + ".journal", journal_of_a_rewrite(writer), fsync=False)
    before = files_with_times(str(tmp_path))
    reader = DBMBackend(path, "r", lock_timeout=5, fsync=False)
    assert reader.get_record(reader.get_key("k")) == b"new"    # the journal as overlay
    assert sorted(reader.iter_keys()) == ["k", "other"]
    assert reader.count_keys() == 2
    assert files_with_times(str(tmp_path)) == before           # a read-only open writes nothing
    assert writer.get_record(writer.get_key("other")) == b"new"    # its handle was refreshed
    assert not os.path.exists(path + ".journal")
    assert reader.get_record(reader.get_key("other")) == b"new"    # now from the database
    reader.close()
    writer.close()


@modules
def test_a_cut_journal_is_moved_aside_reported_and_not_applied(tmp_path, module):
    path = str(tmp_path / "store.db")
    writer = fill(path, module)
    journal.write(path + ".journal", journal_of_a_rewrite(writer), fsync=False)
    with open(path + ".journal", "r+b") as file:
        file.truncate(os.path.getsize(path + ".journal") - 1)
    with open(path + ".journal", "rb") as file:
        damaged = file.read()
    with pytest.warns(RuntimeWarning, match="moved aside"):
        writer.begin()      # a writer recovers first
    assert writer.get_record(writer.get_key("k")) == b"old"
    assert writer.get_key("other") is None
    writer.rollback()
    assert not os.path.exists(path + ".journal")
    kept = [name for name in os.listdir(tmp_path) if ".journal.damaged-" in name]
    assert len(kept) == 1
    assert (tmp_path / kept[0]).read_bytes() == damaged
    assert any(kept[0] in problem for problem in writer.problems())
    writer.close()
    later = DBMBackend(path, "r", lock_timeout=5, fsync=False)
    assert any(kept[0] in problem for problem in later.problems())     # for Store.verify()
    later.close()


def test_dumb_index_torn_during_apply_is_restored(tmp_path):
    """dbm.dumb rewrites its index in place; a kill meanwhile leaves it cut short."""
    path = str(tmp_path / "store.db")
    writer = fill(path, "dbm.dumb")
    changes = journal_of_a_rewrite(writer)
    writer.close()
    journal.write(path + ".journal", changes, fsync=False)
    with open(path + ".dir", "rb") as file:
        index = file.read()
    with open(path + ".dir.saved", "wb") as file:     # what the apply saved first
        file.write(index)
    with open(path + ".dir", "wb") as file:           # then the kill, mid-rewrite
        file.write(index[:len(index) // 3])
    before = files_with_times(str(tmp_path))
    reader = DBMBackend(path, "r", lock_timeout=5, fsync=False)
    assert reader.get_record(reader.get_key("k")) == b"new"
    assert reader.count_keys() == 2
    reader.close()
    assert files_with_times(str(tmp_path)) == before     # the reader repaired nothing
    writer = DBMBackend(path, "w", lock_timeout=5, fsync=False)
    assert writer.get_record(writer.get_key("other")) == b"new"
    assert not os.path.exists(path + ".dir.saved")
    assert not os.path.exists(path + ".journal")
    writer.close()


REBINDER = """
import sys
from pstore.backends.dbm import DBMBackend
backend = DBMBackend(sys.argv[1], "w", lock_timeout=10, fsync=False)
old = backend.get_key("a")
while True:
    backend.begin()
    new = backend.new_oid()
    backend.put_record(new, b"record %d" % new, ())
    backend.bind_key("a", new)
    if old is not None:
        backend.delete_record(old)
    backend.commit()
    old = new
    sys.stdout.write(f"{new}\\n")
    sys.stdout.flush()
"""


@pytest.mark.slow
@modules
def test_readers_never_see_half_a_transaction(tmp_path, module):
    """Each commit moves "a" to a new record and deletes the old one: a reader that saw
    half of one would find "a" bound to a record that is not there (yet or any more)."""
    path = str(tmp_path / "store.db")
    fill(path, module).close()
    writer = subprocess.Popen([sys.executable, "-c", REBINDER, path],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    reader = DBMBackend(path, "r", lock_timeout=10, fsync=False)
    try:
        assert writer.stdout.readline()
        oids = set()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            oid, data = reader.get_item("a")
            assert data == b"record %d" % oid
            [(item_oid, item_data)] = [item[1:] for item in reader.iter_items()
                                       if item[0] == "a"]
            assert item_data == b"record %d" % item_oid
            oids.add(oid)
        print(f"{module}: the reader saw {len(oids)} distinct commits in 1.5 s")
        assert len(oids) > 10, "the writer made too few commits to test anything"
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
        reader.close()
