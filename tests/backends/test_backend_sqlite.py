"""What only the SQLite backend promises: the file format checks, pragmas, and file modes."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time

import pytest

import pstore
from pstore.backends.sqlite import FORMAT_VERSION, SQLiteBackend
from pstore.errors import FormatError, LockTimeoutError

from .conftest import fill, snapshot


def open_sqlite(path: str, flag: str = "c", **options) -> SQLiteBackend:
    options.setdefault("lock_timeout", 5.0)
    options.setdefault("fsync", False)
    return SQLiteBackend(path, flag, **options)


@pytest.mark.parametrize("content", [
    os.urandom(4096),
    b"this is a text file\n" * 200,
    b"SQLite format 3\x00" + os.urandom(200),
])
@pytest.mark.parametrize("flag", ["r", "w", "c", "n"])
def test_not_a_database(tmp_path, content, flag):
    path = str(tmp_path / "file.db")
    with open(path, "wb") as file:
        file.write(content)
    with pytest.raises(FormatError) as raised:
        open_sqlite(path, flag)
    assert path in str(raised.value)
    with open(path, "rb") as file:
        assert file.read() == content


@pytest.mark.parametrize("flag", ["r", "w", "c", "n"])
def test_foreign_sqlite_database_is_refused_and_left_untouched(tmp_path, flag):
    path = str(tmp_path / "foreign.db")
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.commit()
    conn.close()
    before = snapshot(str(tmp_path))
    with pytest.raises(FormatError) as raised:
        open_sqlite(path, flag)
    assert path in str(raised.value)
    assert {name: value for name, value in snapshot(str(tmp_path)).items()
            if not name.endswith(".lock")} == before


@pytest.mark.parametrize("flag", ["r", "w"])
def test_empty_file_is_not_a_store(tmp_path, flag):
    path = str(tmp_path / "empty.db")
    open(path, "wb").close()
    with pytest.raises(FormatError):
        open_sqlite(path, flag)


def test_newer_format_version_is_refused(tmp_path):
    path = str(tmp_path / "store.db")
    fill(open_sqlite(path))
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE name = 'version'", (FORMAT_VERSION + 1,))
    conn.commit()
    conn.close()
    for flag in "rwc":
        with pytest.raises(FormatError, match="newer"):
            open_sqlite(path, flag)


def test_new_files_are_private(tmp_path):
    path = str(tmp_path / "store.db")
    os.umask(0o022)
    backend = open_sqlite(path)
    backend.begin()
    backend.bind_key("k", backend.new_oid())
    backend.commit()
    names = os.listdir(tmp_path)
    assert {"store.db", "store.db-wal", "store.db-shm", "store.db.lock"} <= set(names)
    for name in names:
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    backend.close()


def test_read_only_writes_nothing(tmp_path):
    path = str(tmp_path / "store.db")
    fill(open_sqlite(path))
    before = snapshot(str(tmp_path))
    reader = open_sqlite(path, "r")
    assert reader.get_key("k") is not None
    assert reader.get_record(reader.get_key("k")) == b"data"
    assert list(reader.iter_keys()) == ["k"]
    reader.change_marker()
    reader.close()
    assert snapshot(str(tmp_path)) == before


def test_pragmas(tmp_path):
    path = str(tmp_path / "store.db")
    normal = open_sqlite(path)
    full = open_sqlite(path, fsync=True)
    assert normal._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert normal._conn.execute("PRAGMA synchronous").fetchone()[0] == 1    # NORMAL
    assert full._conn.execute("PRAGMA synchronous").fetchone()[0] == 2      # FULL
    normal.close()
    full.close()


def journal_mode(path: str) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()


def hold_read(path: str, seconds: float) -> subprocess.Popen:
    """Another process that reads ``path`` in one transaction for ``seconds``."""
    reader = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time\n"
         "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
         "conn.execute('BEGIN')\n"
         "conn.execute('SELECT count(*) FROM records').fetchone()\n"
         "print('reading', flush=True)\n"
         "time.sleep(float(sys.argv[2]))\n"
         "conn.execute('COMMIT')\n", path, str(seconds)],
        stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline() == "reading\n"
    return reader


def test_a_writer_waits_for_a_reader_to_switch_the_file_to_wal(tmp_path):
    """The last writer to close leaves the file in rollback-journal mode; the next writer
    switches it back, which needs the file to itself. SQLite fails that switch at once
    while a reader reads (no busy handler runs for it): the open waits instead."""
    path = str(tmp_path / "store.db")
    fill(open_sqlite(path))
    assert journal_mode(path) == "delete"
    reader = hold_read(path, 0.5)
    started = time.monotonic()
    writer = open_sqlite(path, "w", lock_timeout=30)
    assert time.monotonic() - started > 0.2
    assert reader.wait(30) == 0
    assert writer._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert writer.get_record(writer.get_key("k")) == b"data"
    writer.close()


def test_a_reader_longer_than_the_lock_timeout_fails_the_open_and_changes_nothing(tmp_path):
    path = str(tmp_path / "store.db")
    fill(open_sqlite(path))
    before = {name: value for name, value in snapshot(str(tmp_path)).items()
              if not name.endswith(".lock")}
    reader = hold_read(path, 3)
    try:
        with pytest.raises(LockTimeoutError) as raised:
            open_sqlite(path, "w", lock_timeout=0.3)
        assert path in str(raised.value) and "0.3 s" in str(raised.value)
    finally:
        assert reader.wait(30) == 0
    # Only the lock file is written (who last held the lock).
    assert {name: value for name, value in snapshot(str(tmp_path)).items()
            if not name.endswith(".lock")} == before
    assert journal_mode(path) == "delete"


def test_every_operation_after_close_raises_closed_error(tmp_path):
    # The frequent statements share one cursor: it must not outlive the connection.
    path = str(tmp_path / "store.db")
    backend = open_sqlite(path)
    fill(backend)
    other = open_sqlite(path)
    name = other.put_blob([b"blob"])
    other.close()
    calls = {
        "new_oid": backend.new_oid, "get_record": lambda: backend.get_record(1),
        "put_record": lambda: backend.put_record(1, b"x", [2]),
        "delete_record": lambda: backend.delete_record(1),
        "existing": lambda: backend.existing([1]),
        "is_referenced": lambda: backend.is_referenced(1),
        "reaches": lambda: backend.reaches([1], 2),
        "put_blob": lambda: backend.put_blob([b"x"]),
        "get_blob": lambda: backend.get_blob(name, 4, writable=False),
        "read_blob": lambda: list(backend.read_blob(name)),
        "verify_blob": lambda: backend.verify_blob(name),
        "odd_blob_entries": backend.odd_blob_entries,
        "get_key": lambda: backend.get_key("k"), "get_item": lambda: backend.get_item("k"),
        "bind_key": lambda: backend.bind_key("k", 1),
        "unbind_key": lambda: backend.unbind_key("k"),
        "iter_keys": lambda: list(backend.iter_keys()),
        "iter_items": lambda: list(backend.iter_items()),
        "count_keys": backend.count_keys, "begin": backend.begin, "commit": backend.commit,
        "change_marker": backend.change_marker, "gc": backend.gc,
    }
    for operation, call in calls.items():
        with pytest.raises(pstore.ClosedError, match="is closed") as raised:
            call()
            pytest.fail(f"{operation} ran on a closed backend")
        assert raised.value.path == path, operation
    backend.rollback()      # ending nothing, and closing again, are no errors
    backend.close()


# The tables of format version 1 (docs/format.md before version 2), as pstore 0.1 made them.
_VERSION_1 = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value NOT NULL) WITHOUT ROWID",
    "CREATE TABLE records (oid INTEGER PRIMARY KEY, data BLOB NOT NULL)",
    "CREATE TABLE refs (oid INTEGER NOT NULL, ref INTEGER NOT NULL, PRIMARY KEY (oid, ref))"
    " WITHOUT ROWID",
    "CREATE INDEX refs_by_ref ON refs (ref)",
    "CREATE TABLE keys (key TEXT PRIMARY KEY, oid INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE INDEX keys_by_oid ON keys (oid)",
    "INSERT INTO meta VALUES ('format', 'pstore'), ('version', 1), ('next_oid', 3)",
    "PRAGMA application_id = 1884517490",
    # "shared" is [1, 2]; "user" is {"shared": <reference to object id 1>}.
    "INSERT INTO records VALUES (1, X'80059509000000000000005d94284b014b02652e'),"
    " (2, X'80059510000000000000007d948c06736861726564944b0151732e')",
    "INSERT INTO refs VALUES (2, 1)",
    "INSERT INTO keys VALUES ('shared', 1), ('user', 2)",
)


def test_a_version_1_file_is_read_and_upgraded_when_opened_for_writing(tmp_path):
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    for statement in _VERSION_1:
        conn.execute(statement)
    conn.commit()
    conn.close()
    before = snapshot(str(tmp_path))
    with pstore.open(path, "r") as store:
        assert store["user"] == {"shared": [1, 2]}
        assert store["user"]["shared"] is store["shared"]
    assert snapshot(str(tmp_path)) == before        # read-only: still version 1, untouched
    with pstore.open(path, "w") as store:
        assert store["user"]["shared"] is store["shared"]
        store["node"] = [pstore.PersistentList([store["shared"]])]
        store["array"] = pstore.engine.PickleBuffer(bytearray(100_000))   # a blob
    conn = sqlite3.connect(path)
    version = conn.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()
    assert version == (FORMAT_VERSION,)
    assert conn.execute("SELECT count(*) FROM keys WHERE seal IS NULL").fetchone() == (0,)
    assert conn.execute("SELECT oid, ref, lazy FROM refs WHERE oid = 2").fetchall() == [(2, 1, 0)]
    assert conn.execute("SELECT count(*) FROM blob_refs").fetchone() == (1,)
    conn.close()
    with pstore.open(path, "r") as store:
        assert store["node"][0][0] is store["shared"]
        assert bytes(store["array"]) == bytes(100_000)


def test_a_malformed_page_during_a_read_is_a_corruption_error(tmp_path):
    path = str(tmp_path / "store.db")
    with pstore.open(path) as store:
        for index in range(300):
            store[f"k{index}"] = "v" * 500 + str(index)
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'records'").fetchone()
    conn.close()
    with open(path, "r+b") as file:      # the records table's root page loses its header
        file.seek((root - 1) * page_size)
        file.write(bytes(8))
    backend = open_sqlite(path, "r")
    try:
        oid = backend.get_key("k1")     # the keys table is intact
        for read in (lambda: backend.get_record(oid), lambda: backend.get_item("k1"),
                     lambda: list(backend.iter_items())):
            with pytest.raises(pstore.CorruptionError) as raised:
                read()
            assert raised.value.path == path and path in str(raised.value)
            assert "malformed" in str(raised.value)
            assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)
    finally:
        backend.close()
    with pstore.open(path, "r") as store:
        with pytest.raises(pstore.CorruptionError):
            store["k1"]


def test_busy_is_told_by_sqlites_result_code(tmp_path):
    # A process that ignores pstore's lock file holds SQLite's write lock.
    path = str(tmp_path / "store.db")
    fill(open_sqlite(path))
    backend = open_sqlite(path, "w", lock_timeout=0.2)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(pstore.LockTimeoutError) as raised:
            backend.begin()
        if sys.version_info >= (3, 11):     # 3.10's exceptions carry no result code
            assert raised.value.__cause__.sqlite_errorname == "SQLITE_BUSY"
        other.execute("ROLLBACK")
        backend.begin()     # the pstore lock was released with the failure
        backend.rollback()
    finally:
        other.close()
        backend.close()
