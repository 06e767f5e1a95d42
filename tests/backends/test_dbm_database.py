"""JournaledDatabase on its own: a dbm database made transactional, knowing nothing of
what its keys mean (the DBM backend's layout is tested in test_backend_dbm.py; killed
writers in test_dbm_crash.py)."""

from __future__ import annotations

import os

import pytest

from pstore.backends import journal, size_of
from pstore.backends.dbm_database import JournaledDatabase
from pstore.backends.dbm_modules import choose_module
from pstore.errors import ClosedError, CorruptionError, LockTimeoutError, ReadOnlyError
from tests.backends.conftest import available_dbm_modules

modules = pytest.mark.parametrize("module", available_dbm_modules())


def database(path: str, module: str, *, read_only: bool = False, validate=None,
             ended: list | None = None, on_end=None, lock_timeout: float = 5
             ) -> JournaledDatabase:
    db = JournaledDatabase(
        path, choose_module(path, "r" if read_only else "c", module), read_only=read_only,
        lock_timeout=lock_timeout, fsync=False, owner=os.geteuid(),
        validate=validate or (lambda changes, stored: None),
        on_end=on_end or (ended.append if ended is not None else lambda committed: None))
    if not read_only:
        db.create()
    return db


def commit(db: JournaledDatabase, changes: dict[bytes, bytes | None]) -> None:
    """One transaction setting (None: deleting) each key of ``changes``."""
    db.begin()
    for key, value in changes.items():
        db.put(key, value)
    db.commit()


def read(db: JournaledDatabase, key: bytes) -> bytes | None:
    with db.reading():
        return db.get(key)


@modules
def test_a_commit_is_seen_by_another_connection_and_a_rollback_leaves_nothing(tmp_path, module):
    path = str(tmp_path / "db")
    ended: list[bool] = []
    writer, reader = database(path, module, ended=ended), database(path, module)
    marker = reader.change_marker()
    writer.begin()
    writer.put(b"a", b"1")
    assert writer.get(b"a") == b"1" and read(reader, b"a") is None  # not committed yet
    writer.commit()
    assert read(reader, b"a") == b"1" and reader.change_marker() != marker
    writer.begin()
    writer.put(b"a", None)
    writer.put(b"b", b"2")
    writer.rollback()
    assert (read(reader, b"a"), read(reader, b"b")) == (b"1", None)
    assert ended == [True, False]   # on_end: once per transaction, committed or not
    assert not os.path.exists(path + ".journal")
    writer.close()
    reader.close()


@modules
def test_a_write_outside_a_transaction_and_a_closed_database_say_so(tmp_path, module):
    db = database(str(tmp_path / "db"), module)
    with pytest.raises(RuntimeError, match="outside a transaction"):
        db.put(b"a", b"1")
    db.close()
    with pytest.raises(ClosedError):
        read(db, b"a")
    with pytest.raises(ClosedError):
        db.begin()


@modules
def test_a_read_only_connection_reads_a_complete_journal_as_an_overlay(tmp_path, module):
    path = str(tmp_path / "db")
    writer = database(path, module)
    commit(writer, {b"a": b"old"})
    writer.close()
    # What a writer killed after its commit point leaves: the journal, not yet applied.
    journal.write(path + ".journal", {b"a": b"new", b"b": b"2"}, fsync=False)
    reader = database(path, module, read_only=True)
    assert (read(reader, b"a"), read(reader, b"b")) == (b"new", b"2")
    with pytest.raises(ReadOnlyError):
        reader.begin()
    assert os.path.exists(path + ".journal")     # a reader writes nothing
    with reader.snapshot() as snapshot:
        assert snapshot.get(b"a") == b"new" and snapshot.tally() is None
    reader.close()
    writer = database(path, module)   # the next writer applies it
    assert read(writer, b"b") == b"2"
    assert not os.path.exists(path + ".journal")
    writer.close()


@modules
def test_a_journal_its_validator_refuses_is_set_aside_not_applied(tmp_path, module):
    path = str(tmp_path / "db")
    seen: list[dict] = []

    def refuse(changes, stored):
        seen.append(dict(changes))
        raise CorruptionError(path + ".journal", "refused by the test")

    db = database(path, module, validate=refuse)
    journal.write(path + ".journal", {b"a": b"planted"}, fsync=False)
    with pytest.warns(RuntimeWarning, match="refused by the test"):
        assert read(db, b"a") is None
    assert seen == [{b"a": b"planted"}]
    assert any("refused by the test" in problem for problem in db.problems())
    db.close()


@modules
def test_vacuum_keeps_every_live_entry_and_derives_the_derived_key(tmp_path, module):
    path = str(tmp_path / "db")
    db = database(path, module)
    commit(db, {**{b"k%d" % number: b"x" * 200 for number in range(300)}, b"derived": b"old"})
    commit(db, {b"k%d" % number: None for number in range(0, 300, 2)})
    calls: list[bytes] = []

    def derive(new, old):
        calls.append(old)
        return b"derived from " + old

    before = size_of(*db.module.files(path))
    freed = db.vacuum(b"derived", derive)
    # Half the entries were deleted: the files shrank, by what vacuum says.
    assert freed == before - size_of(*db.module.files(path)) and freed > 0
    assert [read(db, b"k%d" % number) for number in (0, 1, 298, 299)] == \
        [None, b"x" * 200, None, b"x" * 200]
    # A rewrite derives the key anew; a module that compacts in place leaves it be.
    assert read(db, b"derived") == (b"derived from old" if calls else b"old")
    db.close()


@modules
def test_on_end_runs_while_the_write_lock_is_still_held(tmp_path, module):
    # The DBM backend deletes a transaction's blobs in on_end: no other writer may start
    # before it is done.
    path = str(tmp_path / "db")
    other = database(path, module, lock_timeout=0.05)
    seen: list[tuple[bool, str]] = []

    def on_end(committed: bool) -> None:
        try:
            other.begin()
        except LockTimeoutError:
            seen.append((committed, "locked"))
        else:
            other.rollback()
            seen.append((committed, "free"))
    writer = database(path, module, on_end=on_end)
    commit(writer, {b"a": b"1"})
    writer.begin()
    writer.put(b"a", b"2")
    writer.rollback()
    assert seen == [(True, "locked"), (False, "locked")]
    commit(other, {b"b": b"3"})     # released once on_end returned
    assert read(writer, b"a") == b"1" and read(writer, b"b") == b"3"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@modules
def test_a_forked_child_takes_locks_of_its_own_and_leaves_the_parents_alone(tmp_path, module):
    path = str(tmp_path / "db")
    db = database(path, module, lock_timeout=0.5)
    commit(db, {b"a": b"1"})
    assert read(db, b"a") == b"1"   # the parent holds a handle and its locks' files open
    db.begin()                      # and the write lock, at the fork
    pid = os.fork()
    if pid == 0:    # the child: exit code 0 if all went as it should
        code = 1
        try:
            db.after_fork()
            try:
                db.begin()      # its own lock: the parent's transaction holds the lock
                code = 2
            except LockTimeoutError:
                code = 0 if read(db, b"a") == b"1" else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    db.put(b"b", b"2")      # the parent's transaction and handle are unharmed
    db.commit()
    assert read(db, b"b") == b"2"
