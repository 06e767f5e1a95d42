"""The SQLite backend: one file, WAL, writers serialized by a sibling lock file.

The tables are described in ``docs/format.md``. Every SQL string is a module
constant so that ``sqlite3``'s statement cache prepares each one once.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sqlite3
from collections.abc import Callable, Collection, Iterator
from typing import Any, NamedTuple, NoReturn

from ..errors import CorruptionError, FormatError, LockTimeoutError, ReadOnlyError
from .base import Backend, binding_seal
from .blobs import BlobStore, LocalBlobs
from .files import FileLock, create_private, require_existing

__all__ = ["SQLiteBackend", "FORMAT_NAME", "FORMAT_VERSION", "APPLICATION_ID"]

#: What the meta table's 'format' row holds in every pstore file.
FORMAT_NAME = "pstore"
#: The newest format version this code reads and the one it writes.
FORMAT_VERSION = 3
#: Written into the SQLite header (offset 68) so that tools can tell a pstore file.
APPLICATION_ID = 0x70537472  # b"pStr"

# Statement by statement: executescript() would commit the transaction it runs in.
_SCHEMA = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value NOT NULL) WITHOUT ROWID",
    "CREATE TABLE records (oid INTEGER PRIMARY KEY, data BLOB NOT NULL)",
    "CREATE TABLE refs (oid INTEGER NOT NULL, ref INTEGER NOT NULL,"
    " lazy INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (oid, ref)) WITHOUT ROWID",
    "CREATE INDEX refs_by_ref ON refs (ref)",
    "CREATE TABLE keys (key TEXT PRIMARY KEY, oid INTEGER NOT NULL, seal BLOB) WITHOUT ROWID",
    "CREATE INDEX keys_by_oid ON keys (oid)",
    "CREATE TABLE blob_refs (oid INTEGER NOT NULL, blob TEXT NOT NULL, PRIMARY KEY (oid, blob))"
    " WITHOUT ROWID",
    f"INSERT INTO meta VALUES ('format', '{FORMAT_NAME}'), ('version', {FORMAT_VERSION}),"
    " ('next_oid', 1), ('digests_from', 1)",
    f"PRAGMA application_id = {APPLICATION_ID}",
)

# Older files become the current version when opened for writing (under the write lock):
# version N runs the statements of every version after it. Version 2 added refs.lazy,
# records of Persistent objects and blobs, which version 1 code would misread; version 3
# record digests and key seals (the seals of existing keys computed by pstore_seal), and
# meta's digests_from: records of smaller ids predate digests.
_UPGRADES = {
    1: ("ALTER TABLE refs ADD COLUMN lazy INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE blob_refs (oid INTEGER NOT NULL, blob TEXT NOT NULL,"
        " PRIMARY KEY (oid, blob)) WITHOUT ROWID"),
    2: ("ALTER TABLE keys ADD COLUMN seal BLOB",
        "UPDATE keys SET seal = pstore_seal(key, oid)",
        "INSERT INTO meta SELECT 'digests_from', value FROM meta WHERE name = 'next_oid'"),
}
_SET_VERSION = f"UPDATE meta SET value = {FORMAT_VERSION} WHERE name = 'version'"
# The first record id with a digest; absent before version 3.
_DIGESTS_FROM = "SELECT value FROM meta WHERE name = 'digests_from'"
# SQLite's primary result codes that say the database is busy, not damaged.
_NOT_DAMAGE = {5, 6, 9}     # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_INTERRUPT

_GET_RECORD = "SELECT data FROM records WHERE oid = ?"
_PUT_RECORD = "INSERT OR REPLACE INTO records (oid, data) VALUES (?, ?)"
_DELETE_RECORD = "DELETE FROM records WHERE oid = ?"
_DELETE_REFS = "DELETE FROM refs WHERE oid = ?"
_PUT_REF = "INSERT OR IGNORE INTO refs (oid, ref) VALUES (?, ?)"
_DELETE_BLOB_REFS = "DELETE FROM blob_refs WHERE oid = ?"
_PUT_BLOB_REF = "INSERT OR IGNORE INTO blob_refs (oid, blob) VALUES (?, ?)"
_REFERENCED_BLOBS = "SELECT DISTINCT blob FROM blob_refs"
_PUT_LAZY_REF = "INSERT OR IGNORE INTO refs (oid, ref, lazy) VALUES (?, ?, 1)"
_NEXT_OID = "SELECT value FROM meta WHERE name = 'next_oid'"
_RESERVE_OIDS = "UPDATE meta SET value = ? WHERE name = 'next_oid'"
# Lists of ids travel as one JSON array parameter, so no statement is built per call.
_EXISTING = "SELECT oid FROM records WHERE oid IN (SELECT value FROM json_each(?))"
_IS_REFERENCED = ("SELECT EXISTS (SELECT 1 FROM keys WHERE oid = ?1)"
                  " OR EXISTS (SELECT 1 FROM refs WHERE ref = ?1)")
_REACHES = """
WITH RECURSIVE reach (oid) AS (
    SELECT value FROM json_each(?1)
    UNION SELECT refs.ref FROM refs JOIN reach ON refs.oid = reach.oid WHERE NOT refs.lazy)
SELECT 1 FROM reach WHERE oid = ?2 LIMIT 1
"""
_LIVE = """
WITH RECURSIVE live (oid) AS (
    SELECT oid FROM keys UNION SELECT refs.ref FROM refs JOIN live ON refs.oid = live.oid)
SELECT oid FROM live
"""
_GC_REFS = f"DELETE FROM refs WHERE oid NOT IN ({_LIVE})"
_GC_RECORDS = f"DELETE FROM records WHERE oid NOT IN ({_LIVE})"
_GC_BLOB_REFS = "DELETE FROM blob_refs WHERE oid NOT IN (SELECT oid FROM records)"
_BIND_KEY = "INSERT OR REPLACE INTO keys (key, oid, seal) VALUES (?, ?, ?)"
_UNBIND_KEY = "DELETE FROM keys WHERE key = ?"
_RECORDS = "SELECT oid, data FROM records WHERE oid > ? ORDER BY oid LIMIT ?"
_REFS_OF = "SELECT ref FROM refs WHERE oid = ?"


class _KeyStatements(NamedTuple):
    first_keys: str
    next_keys: str
    get_key: str
    get_item: str
    first_items: str
    next_items: str


def _key_statements(seal: str) -> _KeyStatements:
    """The statements reading key bindings, with ``seal`` as the seal's column: before
    version 3 (a file read as it is) there is none."""
    items = (f"SELECT key, keys.oid, data, {seal} FROM keys"
             " LEFT JOIN records ON records.oid = keys.oid")
    return _KeyStatements(
        f"SELECT key, oid, {seal} FROM keys ORDER BY key LIMIT ?",
        f"SELECT key, oid, {seal} FROM keys WHERE key > ? ORDER BY key LIMIT ?",
        f"SELECT oid, {seal} FROM keys WHERE key = ?",
        f"SELECT keys.oid, data, {seal} FROM keys LEFT JOIN records ON records.oid = keys.oid"
        " WHERE key = ?",
        f"{items} ORDER BY key LIMIT ?",
        f"{items} WHERE key > ? ORDER BY key LIMIT ?")


# By whether the file's bindings are sealed (format version 3).
_KEY_STATEMENTS = {True: _key_statements("seal"), False: _key_statements("NULL")}
_COUNT_KEYS = "SELECT count(*) FROM keys"
_DATA_VERSION = "PRAGMA data_version"
_COUNT_TABLES = "SELECT count(*) FROM sqlite_master"
_META = "SELECT name, value FROM meta WHERE name IN ('format', 'version')"
_VERSION = "SELECT value FROM meta WHERE name = 'version'"

#: How many object ids :meth:`SQLiteBackend.new_oid` reserves at a time.
_OID_BLOCK = 1000
#: How many keys one query of :meth:`SQLiteBackend.iter_keys` fetches.
_KEY_BATCH = 1000

# Connections inherited from a parent process. Kept referenced forever: closing
# them in the child would act on the parent's (SQLite's POSIX advisory locks
# belong to the process, and closing any descriptor of the file drops them).
_INHERITED: list[object] = []


class _NoCursor:
    """The cursor of a backend without a connection (closed, or failed to reopen after a
    fork): every statement raises, as on a closed connection."""

    def execute(self, *args: object) -> NoReturn:
        raise sqlite3.ProgrammingError("the backend is closed")

    executemany = execute


_NO_CURSOR = _NoCursor()


class SQLiteBackend(LocalBlobs, Backend):
    """A store in one SQLite file (WAL mode while a writer has it open).

    Durability: with ``fsync=False`` (synchronous=NORMAL) a commit that returned
    survives the process being killed; with ``fsync=True`` (synchronous=FULL) it
    also survives power loss or an OS crash. Blobs are files under ``PATH.blobs/``,
    always fsynced before the transaction that uses them commits.
    """

    def __init__(self, path: str, flag: str, *, lock_timeout: float, fsync: bool) -> None:
        self.path = path
        self.read_only = flag == "r"
        self._lock_timeout = lock_timeout
        self._fsync = fsync
        # Object ids are reserved a block at a time (meta 'next_oid' moves past the block in
        # the transaction that needs it): no write per allocation.
        self._next_oid = self._block_end = 0
        self._block_is_committed = False
        self._fresh: set[int] = set()       # oids allocated by the open transaction
        self._in_transaction = False
        self._conn: sqlite3.Connection | None = None
        self._sealed = True     # whether key bindings carry seals (format version 3)
        self._keys_sql = _KEY_STATEMENTS[True]
        self._blobs = BlobStore(path + ".blobs")
        # One cursor for the frequent statements, sparing the cursor Connection.execute
        # makes each time. Each of them has at most one row and reads it, which ends the
        # statement: one left unfinished would keep its read transaction (and snapshot) open.
        self._cursor: sqlite3.Cursor | _NoCursor = _NO_CURSOR
        if flag == "n":
            shutil.rmtree(self._blobs.directory, ignore_errors=True)
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.unlink(path + suffix)
                except FileNotFoundError:
                    pass
        require_existing(path, flag, lambda: os.path.exists(path))
        if flag in ("c", "n"):
            # SQLite gives its -wal and -shm files the permissions of the database file.
            create_private(path)
        self._file_lock = self._make_file_lock()
        try:
            self._connect(create=flag in ("c", "n"))
        except BaseException:
            self._file_lock.close()
            raise

    # -- opening ----------------------------------------------------------------------------

    def _make_file_lock(self) -> FileLock:
        return FileLock(self.path + ".lock", self._lock_timeout)

    def _connect(self, create: bool) -> None:
        if self.read_only:
            uri = pathlib.Path(self.path).absolute().as_uri() + "?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn = conn
        self._cursor = conn.cursor()
        try:
            # Readers wait this long for a checkpoint or WAL recovery instead of failing
            # with "database is locked"; writers already hold the file lock.
            conn.execute(f"PRAGMA busy_timeout = {int(self._lock_timeout * 1000)}")
            if self.read_only:
                self._check_format()
            else:
                # Checked before the first write, so a foreign database is left untouched.
                self._init_or_check(create)
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {'FULL' if self._fsync else 'NORMAL'}")
        except sqlite3.OperationalError as error:
            conn.close()
            self._conn = None
            self._cursor = _NO_CURSOR
            if "locked" in str(error):
                raise LockTimeoutError(self.path, self._lock_timeout) from error
            raise   # e.g. no permission: not a question of format
        except sqlite3.DatabaseError as error:
            # SQLITE_NOTADB or SQLITE_CORRUPT: random bytes, a text file, ...
            conn.close()
            self._conn = None
            self._cursor = _NO_CURSOR
            raise FormatError(self.path, f"not an SQLite database ({error})") from None
        except BaseException:
            conn.close()
            self._conn = None
            self._cursor = _NO_CURSOR
            raise

    def _init_or_check(self, create: bool) -> None:
        """Create the schema in an empty database (under the write lock), else check it."""
        conn = self._require()
        if conn.execute(_COUNT_TABLES).fetchone()[0]:
            if self._check_format() < FORMAT_VERSION:
                self._upgrade()
                self._check_format()
            return
        if not create:
            raise FormatError(self.path, "an empty file")
        self._change_schema(_SCHEMA, lambda: not conn.execute(_COUNT_TABLES).fetchone()[0])
        self._check_format()

    def _upgrade(self) -> None:
        """Bring a file of an older version to the current version."""
        conn = self._require()
        conn.create_function("pstore_seal", 2, binding_seal, deterministic=True)
        version = conn.execute(_VERSION).fetchone()[0]
        statements = [statement for step in range(version, FORMAT_VERSION)
                      for statement in _UPGRADES[step]]
        self._change_schema((*statements, _SET_VERSION),
                            lambda: conn.execute(_VERSION).fetchone()[0] == version)

    def _change_schema(self, statements: tuple[str, ...], needed: Callable[[], bool]) -> None:
        """Run ``statements`` in one write transaction, if ``needed()`` under the write lock:
        another process may have done it while this one waited for the lock."""
        self.begin()
        try:
            if needed():
                for statement in statements:
                    self._require().execute(statement)
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def _check_format(self) -> int:
        """Check that the file is a pstore store this code reads; return its version."""
        conn = self._require()
        try:
            meta = dict(conn.execute(_META).fetchall())
        except sqlite3.OperationalError:
            raise FormatError(self.path, "an SQLite database without pstore's tables") from None
        if meta.get("format") != FORMAT_NAME or not isinstance(meta.get("version"), int):
            raise FormatError(self.path, "an SQLite database without pstore's meta rows")
        if meta["version"] > FORMAT_VERSION:
            raise FormatError(self.path, f"format version {meta['version']} was written by a "
                                         f"newer pstore; this one reads up to {FORMAT_VERSION}")
        self._sealed = meta["version"] >= 3
        self._keys_sql = _KEY_STATEMENTS[self._sealed]
        if not self._sealed:
            self.digests_from = 1 << 63     # any record may predate digests
        else:
            row = conn.execute(_DIGESTS_FROM).fetchone()
            self.digests_from = row[0] if row is not None and isinstance(row[0], int) else 1
        return meta["version"]

    def _require(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            raise sqlite3.ProgrammingError("the backend is closed")
        return conn

    # -- records ----------------------------------------------------------------------------

    def new_oid(self) -> int:
        if self._next_oid == self._block_end:
            conn = self._require()
            # Ids below meta's next_oid are never allocated again, even after gc() freed
            # them: another process may still hold an object under such an id.
            first = conn.execute(_NEXT_OID).fetchone()[0]
            conn.execute(_RESERVE_OIDS, (first + _OID_BLOCK,))
            self._next_oid, self._block_end = first, first + _OID_BLOCK
            self._block_is_committed = False
        oid = self._next_oid
        self._next_oid = oid + 1
        self._fresh.add(oid)
        return oid

    def get_record(self, oid: int) -> bytes | None:
        row = self._cursor.execute(_GET_RECORD, (oid,)).fetchone()
        return None if row is None else row[0]

    def put_record(self, oid: int, data: bytes, refs: Collection[int],
                   *, lazy_refs: Collection[int] = (), blobs: Collection[str] = ()) -> None:
        cursor = self._cursor
        cursor.execute(_PUT_RECORD, (oid, data))
        if oid not in self._fresh:      # a record allocated by this transaction has no refs yet
            cursor.execute(_DELETE_REFS, (oid,))
            cursor.execute(_DELETE_BLOB_REFS, (oid,))
        if lazy_refs:
            lazy = set(lazy_refs)
            cursor.executemany(_PUT_LAZY_REF, [(oid, ref) for ref in lazy])
            refs = [ref for ref in refs if ref not in lazy]
        if refs:
            cursor.executemany(_PUT_REF, [(oid, ref) for ref in refs])
        if blobs:
            cursor.executemany(_PUT_BLOB_REF, [(oid, name) for name in blobs])

    def delete_record(self, oid: int) -> None:
        conn = self._require()
        conn.execute(_DELETE_RECORD, (oid,))
        conn.execute(_DELETE_REFS, (oid,))
        conn.execute(_DELETE_BLOB_REFS, (oid,))

    def existing(self, oids: Collection[int]) -> set[int]:
        if not oids:
            return set()
        rows = self._require().execute(_EXISTING, (json.dumps(list(oids)),))
        return {row[0] for row in rows}

    def is_referenced(self, oid: int) -> bool:
        return bool(self._require().execute(_IS_REFERENCED, (oid,)).fetchone()[0])

    def reaches(self, sources: Collection[int], target: int) -> bool:
        rows = self._require().execute(_REACHES, (json.dumps(list(sources)), target))
        return rows.fetchone() is not None

    # -- keys -------------------------------------------------------------------------------

    def _checked(self, key: Any, oid: Any, seal: Any) -> None:
        """Raise :class:`CorruptionError` unless ``seal`` is that of binding ``key`` -> ``oid``."""
        if type(key) is not str or type(oid) is not int:    # a damaged row's types
            raise CorruptionError(self.path, f"the keys table holds {key!r} -> {oid!r}, not a "
                                  f"key and an object id", key=str(key))
        if self._sealed and seal != binding_seal(key, oid):
            raise CorruptionError(self.path, f"the binding of the key to object id {oid} does "
                                  f"not match its seal", key=key, object_id=oid)

    def get_key(self, key: str) -> int | None:
        row = self._cursor.execute(self._keys_sql.get_key, (key,)).fetchone()
        if row is None:
            return None
        self._checked(key, *row)
        return row[0]

    def get_item(self, key: str) -> tuple[int, bytes | None] | None:
        row = self._cursor.execute(self._keys_sql.get_item, (key,)).fetchone()
        if row is None:
            return None
        oid, data, seal = row
        self._checked(key, oid, seal)
        return oid, data

    def bind_key(self, key: str, oid: int) -> int | None:
        previous = self.get_key(key)
        if previous != oid:
            self._cursor.execute(_BIND_KEY, (key, oid, binding_seal(key, oid)))
        return previous

    def unbind_key(self, key: str) -> int | None:
        oid = self.get_key(key)
        if oid is not None:
            self._cursor.execute(_UNBIND_KEY, (key,))
        return oid

    def iter_keys(self) -> Iterator[str]:
        # Keyset pagination: each batch is a short statement of its own, so no read
        # transaction stays open between batches (it would hold back checkpoints) and
        # writes between batches are allowed.
        # Each binding's seal is checked: a damaged key would be listed, yet not found.
        batch = self._require().execute(self._keys_sql.first_keys, (_KEY_BATCH,)).fetchall()
        while batch:
            for key, oid, seal in batch:
                self._checked(key, oid, seal)
                yield key
            if len(batch) < _KEY_BATCH:
                return
            batch = self._require().execute(self._keys_sql.next_keys,
                                            (batch[-1][0], _KEY_BATCH)).fetchall()

    def iter_items(self) -> Iterator[tuple[str, int, bytes | None]]:
        rows = self._require().execute(self._keys_sql.first_items, (_KEY_BATCH,)).fetchall()
        while rows:
            for key, oid, data, seal in rows:
                self._checked(key, oid, seal)
                yield key, oid, data
            if len(rows) < _KEY_BATCH:
                return
            rows = self._require().execute(self._keys_sql.next_items,
                                           (rows[-1][0], _KEY_BATCH)).fetchall()

    def count_keys(self) -> int:
        return self._require().execute(_COUNT_KEYS).fetchone()[0]

    # -- transactions -----------------------------------------------------------------------

    def begin(self) -> None:
        if self.read_only:
            raise ReadOnlyError(self.path, "write")
        conn = self._require()
        if not self._file_lock.acquire():
            raise LockTimeoutError(self.path, self._lock_timeout)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as error:
            self._file_lock.release()
            # Only a process that ignores the lock file (not pstore) can cause this.
            raise LockTimeoutError(self.path, self._lock_timeout) from error
        self._in_transaction = True

    def commit(self) -> None:
        committed = False
        try:
            self._require().execute("COMMIT")
            committed = self._block_is_committed = True
        finally:
            self._end(committed)

    def rollback(self) -> None:
        try:
            if self._conn is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        finally:
            self._end(committed=False)

    def _end(self, committed: bool) -> None:
        if not self._block_is_committed:
            # The reservation was rolled back: another process may reserve the same block.
            self._next_oid = self._block_end = 0
        self._fresh.clear()
        if self._in_transaction:
            self._in_transaction = False
            try:
                self._blobs.end(committed)      # still under the lock: see BlobStore.end
            finally:
                self._file_lock.release()

    def change_marker(self) -> int:
        return self._cursor.execute(_DATA_VERSION).fetchone()[0]

    # -- maintenance ------------------------------------------------------------------------

    def iter_records(self) -> Iterator[tuple[int, bytes, list[int]]]:
        conn = self._require()
        rows = conn.execute(_RECORDS, (0, _KEY_BATCH)).fetchall()
        while rows:
            for oid, data in rows:
                yield oid, data, [row[0] for row in conn.execute(_REFS_OF, (oid,))]
            if len(rows) < _KEY_BATCH:
                return
            rows = conn.execute(_RECORDS, (rows[-1][0], _KEY_BATCH)).fetchall()

    def is_damage(self, error: Exception) -> bool:
        if isinstance(error, sqlite3.OperationalError):
            # No code: raised by the sqlite3 module itself, e.g. for text that is not UTF-8.
            code = getattr(error, "sqlite_errorcode", None)
            return code is None or code & 0xFF not in _NOT_DAMAGE
        return isinstance(error, sqlite3.DatabaseError) or super().is_damage(error)

    def gc(self) -> int:
        # Both deletes compute the live set with a recursive CTE whose working set is kept
        # by SQLite (spilling to temporary files), never in Python. Refs first: deleting
        # refs of unreachable records does not change what is reachable.
        conn = self._require()
        conn.execute(_GC_REFS)
        deleted = conn.execute(_GC_RECORDS).rowcount
        conn.execute(_GC_BLOB_REFS)
        self._blobs.collect({row[0] for row in conn.execute(_REFERENCED_BLOBS)})
        return deleted

    def after_fork(self) -> None:
        if self._conn is None:
            return
        _INHERITED.append(self._conn)
        self._file_lock.abandon()
        self._conn = None
        self._cursor = _NO_CURSOR
        self._in_transaction = False
        # The parent goes on allocating from its block: the child must not.
        self._next_oid = self._block_end = 0
        self._file_lock = self._make_file_lock()
        self._connect(create=False)

    def close(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            self.rollback()
            if not self.read_only:
                # The last writer to close puts the file back in rollback-journal mode, so
                # that a later read-only open needs no -wal/-shm files and creates none.
                # Fails harmlessly (and at once: no busy wait) while others have it open.
                conn.execute("PRAGMA busy_timeout = 0")
                try:
                    conn.execute("PRAGMA journal_mode = DELETE")
                except sqlite3.OperationalError:
                    pass
        finally:
            self._conn = None
            self._cursor = _NO_CURSOR
            self._file_lock.close()
            conn.close()
