"""What only the SQLite backend promises: the file format checks, pragmas, and file modes."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

import pstore
from pstore.backends.sqlite import FORMAT_VERSION, SQLiteBackend
from pstore.errors import FormatError

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
@pytest.mark.parametrize("flag", ["r", "w", "c"])
def test_not_a_database(tmp_path, content, flag):
    path = str(tmp_path / "file.db")
    with open(path, "wb") as file:
        file.write(content)
    with pytest.raises(FormatError) as raised:
        open_sqlite(path, flag)
    assert path in str(raised.value)
    with open(path, "rb") as file:
        assert file.read() == content


@pytest.mark.parametrize("flag", ["r", "w", "c"])
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


def test_no_statement_runs_after_close(tmp_path):
    # The frequent statements share one cursor: it must not outlive the connection.
    backend = open_sqlite(str(tmp_path / "store.db"))
    fill(backend)
    backend.close()
    for call in (lambda: backend.get_item("k"), lambda: backend.get_key("k"),
                 lambda: backend.get_record(1), backend.change_marker,
                 lambda: backend.put_record(1, b"x", [2])):
        with pytest.raises(sqlite3.ProgrammingError):
            call()


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
    assert conn.execute("SELECT value FROM meta WHERE name = 'version'").fetchone() == (3,)
    assert conn.execute("SELECT count(*) FROM keys WHERE seal IS NULL").fetchone() == (0,)
    assert conn.execute("SELECT oid, ref, lazy FROM refs WHERE oid = 2").fetchall() == [(2, 1, 0)]
    assert conn.execute("SELECT count(*) FROM blob_refs").fetchone() == (1,)
    conn.close()
    with pstore.open(path, "r") as store:
        assert store["node"][0][0] is store["shared"]
        assert bytes(store["array"]) == bytes(100_000)
