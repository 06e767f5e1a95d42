"""The SQLite backend: one file, WAL, writers serialized by a sibling lock file.

The tables are described in ``docs/format.md``. Every SQL string is a module
constant so that ``sqlite3``'s statement cache prepares each one once.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, NoReturn

try:
    # The C module the sqlite3 package wraps: the same connect, classes and exceptions,
    # without sqlite3.dbapi2's datetime adapters (which pstore does not use): importing
    # datetime for them costs a millisecond of a first open, a fifth of it.
    import _sqlite3 as sqlite3
except ImportError:     # an interpreter that builds it under another name
    import sqlite3  # type: ignore[no-redef]

from ..errors import ClosedError, CorruptionError, FormatError, LockTimeoutError, ReadOnlyError
from . import size_of
from .base import (
    READ_AHEAD_RECORD_MAX,
    Backend,
    ReadAhead,
    RecordWrite,
    Statistics,
    binding_seal,
    check_meta_name,
    check_reserved,
)
from .files import FileLock, create_private, key_lock_file, require_existing, store_owner
from .local_blobs import LocalBlobs

__all__ = ["SQLiteBackend", "FORMAT_NAME", "FORMAT_VERSION", "APPLICATION_ID"]

#: What the meta table's 'format' row holds in every pstore file.
FORMAT_NAME = "pstore"
#: The newest format version this code reads and the one it writes.
FORMAT_VERSION = 5
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
# meta's digests_from: records of smaller ids predate digests; version 4 BLAKE3 blob names
# (older blobs keep their BLAKE2b names, which version 3 code would not read beside them).
_UPGRADES = {
    1: ("ALTER TABLE refs ADD COLUMN lazy INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE blob_refs (oid INTEGER NOT NULL, blob TEXT NOT NULL,"
        " PRIMARY KEY (oid, blob)) WITHOUT ROWID"),
    2: ("ALTER TABLE keys ADD COLUMN seal BLOB",
        "UPDATE keys SET seal = pstore_seal(key, oid)",
        "INSERT INTO meta SELECT 'digests_from', value FROM meta WHERE name = 'next_oid'"),
    3: (),
    4: (),     # version 5: signed records (envelope version 3) and the key fingerprint
}
_SET_VERSION = f"UPDATE meta SET value = {FORMAT_VERSION} WHERE name = 'version'"
# The first record id with a digest; absent before version 3.
_DIGESTS_FROM = "SELECT value FROM meta WHERE name = 'digests_from'"
# SQLite's primary result codes that say the database is busy, not damaged.
_NOT_DAMAGE = {5, 6, 9}     # SQLITE_BUSY, SQLITE_LOCKED, SQLITE_INTERRUPT

# Flag 'n' on an existing store, in one transaction. next_oid stays: another open Store may
# still hold objects under the ids given out so far.
_EMPTY = (
    "DELETE FROM keys",
    "DELETE FROM refs",
    "DELETE FROM blob_refs",
    "DELETE FROM records",
)

_GET_RECORD = "SELECT data FROM records WHERE oid = ?"
_PUT_RECORD = "INSERT OR REPLACE INTO records (oid, data) VALUES (?, ?)"
_DELETE_RECORD = "DELETE FROM records WHERE oid = ?"
_DELETE_REFS = "DELETE FROM refs WHERE oid = ?"
_REFS_OF = "SELECT ref FROM refs WHERE oid = ?"
_EAGER_REFS_OF = "SELECT ref FROM refs WHERE oid = ? AND NOT lazy"
_PUT_REF = "INSERT OR IGNORE INTO refs (oid, ref) VALUES (?, ?)"
_DELETE_BLOB_REFS = "DELETE FROM blob_refs WHERE oid = ?"
_PUT_BLOB_REF = "INSERT OR IGNORE INTO blob_refs (oid, blob) VALUES (?, ?)"
_REFERENCED_BLOBS = "SELECT DISTINCT blob FROM blob_refs"
_PUT_LAZY_REF = "INSERT OR IGNORE INTO refs (oid, ref, lazy) VALUES (?, ?, 1)"
_NEXT_OID = "SELECT value FROM meta WHERE name = 'next_oid'"
_GET_META = "SELECT value FROM meta WHERE name = ?"
_SET_META = "INSERT OR REPLACE INTO meta VALUES (?, ?)"
_RESERVE_OIDS = "UPDATE meta SET value = ? WHERE name = 'next_oid'"
_RESERVE_IDS_UP_TO = "UPDATE meta SET value = max(value, ?) WHERE name = 'next_oid'"
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
_BIND_NEW_KEY = "INSERT OR IGNORE INTO keys (key, oid, seal) VALUES (?, ?, ?)"
_UNBIND_KEY = "DELETE FROM keys WHERE key = ?"
_RECORDS = "SELECT oid, data FROM records WHERE oid > ? ORDER BY oid LIMIT ?"
_REFS_OF = "SELECT ref FROM refs WHERE oid = ?"


class _KeyStatements(NamedTuple):
    first_keys: str
    next_keys: str
    get_key: str
    get_keys: str
    get_item: str
    first_items: str
    next_items: str
    read_ahead: str
    read_ahead_before: str


def _key_statements(seal: str) -> _KeyStatements:
    """The statements reading key bindings, with ``seal`` as the seal's column: before
    version 3 (a file read as it is) there is none."""
    items = (f"SELECT key, keys.oid, data, {seal} FROM keys"
             " LEFT JOIN records ON records.oid = keys.oid")
    read_ahead = (f"SELECT key, keys.oid, CASE WHEN length(data) <= {READ_AHEAD_RECORD_MAX}"
                  f" THEN data END, length(data), {seal} FROM keys"
                  " LEFT JOIN records ON records.oid = keys.oid")
    return _KeyStatements(
        f"SELECT key, oid, {seal} FROM keys ORDER BY key LIMIT ?",
        f"SELECT key, oid, {seal} FROM keys WHERE key > ? ORDER BY key LIMIT ?",
        f"SELECT oid, {seal} FROM keys WHERE key = ?",
        f"SELECT key, oid, {seal} FROM keys WHERE key IN",     # then the keys' placeholders
        f"SELECT keys.oid, data, {seal} FROM keys LEFT JOIN records ON records.oid = keys.oid"
        " WHERE key = ?",
        f"{items} ORDER BY key LIMIT ?",
        f"{items} WHERE key > ? ORDER BY key LIMIT ?",
        f"{read_ahead} WHERE key >= ? ORDER BY key LIMIT ?",
        f"{read_ahead} WHERE key >= ? AND key < ? ORDER BY key LIMIT ?")


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
#: How many key bindings a write transaction remembers (see SQLiteBackend._tx_bindings).
_KNOWN_BINDINGS_MAX = 100_000
#: How many keys :meth:`SQLiteBackend.bind_keys` binds per statement (SQLite before 3.32
#: allows 999 parameters in one).
_BIND_CHUNK = 500

# SQLite's primary result codes (an extended code carries its primary one in the low byte).
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_CORRUPT, _SQLITE_NOTADB = 5, 6, 11, 26
_BUSY = (_SQLITE_BUSY, _SQLITE_LOCKED)
_DAMAGED = (_SQLITE_CORRUPT, _SQLITE_NOTADB)
# Python 3.10's sqlite3 exceptions carry no result code, only SQLite's message. For these
# codes SQLite's message is its fixed English text for the code (sqlite3_errstr), which
# SQLite has never changed; SQLITE_LOCKED may name the table after a colon. Matching the
# whole text (not a word in it) keeps, say, a file named "locked" from counting as busy.
_CODE_OF_MESSAGE = {
    "database is locked": _SQLITE_BUSY,
    "database table is locked": _SQLITE_LOCKED,
    "database schema is locked": _SQLITE_LOCKED,
    "database disk image is malformed": _SQLITE_CORRUPT,
    "file is not a database": _SQLITE_NOTADB,
}


def _result_code(error: sqlite3.Error) -> int | None:
    """The primary SQLite result code of ``error``, when it can be known."""
    if sys.version_info >= (3, 11):
        code = getattr(error, "sqlite_errorcode", None)
        return None if code is None else code & 0xFF
    return _CODE_OF_MESSAGE.get(str(error).partition(":")[0])


# Connections inherited from a parent process. Kept referenced forever: closing
# them in the child would act on the parent's (SQLite's POSIX advisory locks
# belong to the process, and closing any descriptor of the file drops them).
_INHERITED: list[object] = []


_RECORD_TOTALS = "SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM records"


def _id_array(oids: Collection[int]) -> str:
    """Object ids as the JSON array ``json_each`` reads (written here: importing json for
    this would cost every first open)."""
    return f"[{','.join([str(int(oid)) for oid in oids])}]"


class _ClosedCursor:
    """The cursor of a backend without a connection (closed, or failed to reopen after a
    fork): every statement raises :class:`~pstore.ClosedError`."""

    def __init__(self, path: str) -> None:
        self._path = path

    def execute(self, *args: object) -> NoReturn:
        raise ClosedError(self._path)

    executemany = execute


class SQLiteBackend(LocalBlobs, Backend):
    """A store in one SQLite file (WAL mode while a writer has it open).

    Durability: with ``fsync=False`` (synchronous=NORMAL) a commit that returned
    survives the process being killed; with ``fsync=True`` (synchronous=FULL) it
    also survives power loss or an OS crash. Blobs are files under ``PATH.blobs/``,
    always fsynced before the transaction that uses them commits.
    """

    name = "sqlite"

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
        # key -> oid (None: unbound) as the open write transaction read or wrote it: while
        # it holds the write lock no one else binds keys, so a binding read once is known.
        self._tx_bindings: dict[str, int | None] = {}
        self._in_transaction = False
        self._read_ahead: ReadAhead | None = None     # in a snapshot (see begin_read)
        self._conn: sqlite3.Connection | None = None
        self._sealed = True     # whether key bindings carry seals (format version 3)
        self._binding_new_keys = True   # whether the last key bound was new (see bind_key)
        self._keys_sql = _KEY_STATEMENTS[True]
        # One cursor for the frequent statements, sparing the cursor Connection.execute
        # makes each time. Each of them has at most one row and reads it, which ends the
        # statement: one left unfinished would keep its read transaction (and snapshot) open.
        self._closed_cursor = _ClosedCursor(path)
        self._cursor: sqlite3.Cursor | _ClosedCursor = self._closed_cursor
        require_existing(path, flag, lambda: os.path.exists(path))
        if flag in ("c", "n"):
            # SQLite gives its -wal and -shm files the permissions of the database file.
            create_private(path)
        self._file_lock = self._make_file_lock()
        try:
            self._connect(create=flag in ("c", "n"), empty=flag == "n")
        except BaseException:
            self._file_lock.close()
            raise

    # -- opening ----------------------------------------------------------------------------

    def _make_file_lock(self) -> FileLock:
        return FileLock(self.path + ".lock", self._lock_timeout, owner=store_owner([self.path]),
                        names_holder=not self.read_only)

    def _connect(self, create: bool, empty: bool = False) -> None:
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
                # The connection's own setting (it writes nothing): before the first write.
                conn.execute(f"PRAGMA synchronous = {'FULL' if self._fsync else 'NORMAL'}")
                # Checked before the first write, so a foreign database is left untouched.
                self._init_or_check(create, empty)
                self._enter_wal()
        except sqlite3.DatabaseError as error:
            conn.close()
            self._conn = None
            self._cursor = self._closed_cursor
            code = _result_code(error)
            if code in _BUSY:
                raise LockTimeoutError(self.path, self._lock_timeout) from error
            if code in _DAMAGED or not isinstance(error, sqlite3.OperationalError):
                # Random bytes, a text file, a damaged header: not a store this can open.
                raise FormatError(self.path, f"not an SQLite database ({error})") from None
            raise   # e.g. no permission: not a question of format
        except BaseException:
            conn.close()
            self._conn = None
            self._cursor = self._closed_cursor
            raise

    def _init_or_check(self, create: bool, empty: bool) -> None:
        """Create the schema in an empty database (under the write lock), else check it;
        ``empty``: then remove every key, record and blob of the store (flag 'n')."""
        conn = self._require()
        if conn.execute(_COUNT_TABLES).fetchone()[0]:
            if self._check_format() < FORMAT_VERSION:
                self._upgrade()
                self._check_format()
            if empty:
                self._write_once(self._empty)
            return
        if not create:
            raise FormatError(self.path, "an empty file")
        # A brand-new store is empty already: one transaction, as for flag 'c'. In WAL mode
        # from the start: the schema's commit then costs no rollback journal and no switch.
        # The switch writes the new file's first page through a rollback journal, synced
        # three times (a millisecond, a third of a first open): without fsync= it is not
        # synced, as the schema's commit in WAL is not -- a power loss may leave the file
        # empty (it is then created again) or, at worst, unreadable (FormatError); it held
        # nothing yet.
        if not self._fsync:
            conn.execute("PRAGMA synchronous = OFF")
        self._enter_wal()
        if not self._fsync:
            conn.execute("PRAGMA synchronous = NORMAL")
        self._write_once(lambda: self._run(_SCHEMA),
                         lambda: not conn.execute(_COUNT_TABLES).fetchone()[0])
        self._check_format()

    def _enter_wal(self) -> None:
        """Put the file in WAL mode. It is a property of the file, so usually it is in WAL
        already; it is not when new, or after the last writer closed (see :meth:`close`).
        The switch takes the file for itself. Readers are waited for (the busy timeout),
        but two connections switching at once fail one of them at once, as a deadlock
        (SQLite runs no busy handler for it): so the switch is made under the write lock."""
        conn = self._require()
        if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            return
        self._file_lock.lock(self.path)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
        finally:
            self._file_lock.release()

    def _upgrade(self) -> None:
        """Bring a file of an older version to the current version."""
        conn = self._require()
        conn.create_function("pstore_seal", 2, binding_seal, deterministic=True)
        version = conn.execute(_VERSION).fetchone()[0]
        statements = [statement for step in range(version, FORMAT_VERSION)
                      for statement in _UPGRADES[step]]
        self._write_once(lambda: self._run((*statements, _SET_VERSION)),
                         lambda: conn.execute(_VERSION).fetchone()[0] == version)

    def _empty(self) -> None:
        """Flag 'n' on an existing store: what other Stores see at their next read is an
        empty store, and what they write later lands in it."""
        self._run(_EMPTY)
        self.collect_blobs(())     # deleted when the transaction commits

    def _run(self, statements: tuple[str, ...]) -> None:
        conn = self._require()
        for statement in statements:
            conn.execute(statement)

    def _write_once(self, change: Callable[[], None],
                    needed: Callable[[], bool] = lambda: True) -> None:
        """Make ``change`` in one write transaction, if ``needed()`` under the write lock
        (another process may have done it while this one waited for the lock)."""
        self.begin()
        try:
            if needed():
                change()
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def _check_format(self) -> int:
        """Check that the file is a pstore store this code reads; return its version."""
        conn = self._require()
        try:
            meta = dict(conn.execute(_META).fetchall())
        except sqlite3.OperationalError as error:
            if _result_code(error) in _BUSY:
                raise
            raise FormatError(self.path, "an SQLite database without pstore's tables") from None
        if meta.get("format") != FORMAT_NAME or not isinstance(meta.get("version"), int):
            raise FormatError(self.path, "an SQLite database without pstore's meta rows")
        if meta["version"] > FORMAT_VERSION:
            raise FormatError(self.path, f"format version {meta['version']} was written by a "
                                         f"newer pstore; this one reads up to {FORMAT_VERSION}")
        self._sealed = meta["version"] >= 3
        self._keys_sql = _KEY_STATEMENTS[self._sealed]
        # Version 1 has no lazy refs (no column for them): every ref is followed at once.
        self._eager_refs_sql = _EAGER_REFS_OF if meta["version"] >= 2 else _REFS_OF
        if not self._sealed:
            self.digests_from = 1 << 63     # any record may predate digests
        else:
            row = conn.execute(_DIGESTS_FROM).fetchone()
            self.digests_from = row[0] if row is not None and isinstance(row[0], int) else 1
        return meta["version"]

    def _require(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            raise ClosedError(self.path)
        return conn

    def _failed(self, error: sqlite3.DatabaseError) -> NoReturn:
        """Raise what ``error`` of a statement means: a damaged file (a malformed page)
        becomes a :class:`~pstore.CorruptionError`, anything else stays as it is."""
        if _result_code(error) in _DAMAGED:
            raise CorruptionError(self.path, f"SQLite reports: {error}") from error
        raise error

    # -- records ----------------------------------------------------------------------------

    def new_oid(self) -> int:
        if self._next_oid == self._block_end:
            conn = self._require()
            # Ids below meta's next_oid are never allocated again, even after gc() freed
            # them: another process may still hold an object under such an id.
            try:
                first = conn.execute(_NEXT_OID).fetchone()[0]
                conn.execute(_RESERVE_OIDS, (first + _OID_BLOCK,))
            except sqlite3.DatabaseError as error:
                self._failed(error)
            self._next_oid, self._block_end = first, first + _OID_BLOCK
            self._block_is_committed = False
        oid = self._next_oid
        self._next_oid = oid + 1
        self._fresh.add(oid)
        return oid

    def reserve_ids(self, up_to: int) -> None:
        check_reserved(up_to)
        try:
            self._require().execute(_RESERVE_IDS_UP_TO, (up_to + 1,))
        except sqlite3.DatabaseError as error:
            self._failed(error)
        if self._next_oid <= up_to:     # the block this connection holds: given up
            self._next_oid = self._block_end = 0

    def get_record(self, oid: int) -> bytes | None:
        try:
            row = self._cursor.execute(_GET_RECORD, (oid,)).fetchone()
        except sqlite3.DatabaseError as error:
            self._failed(error)
        return None if row is None else row[0]

    def put_record(self, oid: int, data: bytes, refs: Collection[int],
                   *, lazy_refs: Collection[int] = (), blobs: Collection[str] = ()) -> None:
        self.put_records([RecordWrite(oid, data, refs, lazy_refs, blobs)])

    def put_records(self, records: Iterable[RecordWrite]) -> None:
        # One executemany per statement for the whole batch: the sqlite3 module's cost per
        # execute() call is most of what writing a small record costs.
        rows, rewritten, ref_rows, lazy_rows, blob_rows = [], [], [], [], []
        fresh = self._fresh
        for oid, data, refs, lazy_refs, blobs in records:
            rows.append((oid, data))
            if oid not in fresh:    # a record allocated by this transaction has no refs yet
                rewritten.append((oid,))
            if lazy_refs:
                lazy = set(lazy_refs)
                lazy_rows += [(oid, ref) for ref in lazy]
                refs = [ref for ref in refs if ref not in lazy]
            if refs:
                ref_rows += [(oid, ref) for ref in refs]
            if blobs:
                blob_rows += [(oid, name) for name in blobs]
        cursor = self._cursor
        try:
            cursor.executemany(_PUT_RECORD, rows)
            if rewritten:
                cursor.executemany(_DELETE_REFS, rewritten)
                cursor.executemany(_DELETE_BLOB_REFS, rewritten)
            if lazy_rows:
                cursor.executemany(_PUT_LAZY_REF, lazy_rows)
            if ref_rows:
                cursor.executemany(_PUT_REF, ref_rows)
            if blob_rows:
                cursor.executemany(_PUT_BLOB_REF, blob_rows)
        except sqlite3.DatabaseError as error:
            self._failed(error)

    def delete_record(self, oid: int) -> None:
        cursor = self._cursor
        cursor.execute(_DELETE_RECORD, (oid,))
        cursor.execute(_DELETE_REFS, (oid,))
        cursor.execute(_DELETE_BLOB_REFS, (oid,))

    def existing(self, oids: Collection[int]) -> set[int]:
        if not oids:
            return set()
        try:
            rows = self._require().execute(_EXISTING, (_id_array(oids),))
            return {row[0] for row in rows}
        except sqlite3.DatabaseError as error:
            self._failed(error)

    def is_referenced(self, oid: int) -> bool:
        try:
            return bool(self._cursor.execute(_IS_REFERENCED, (oid,)).fetchone()[0])
        except sqlite3.DatabaseError as error:
            self._failed(error)

    def reaches(self, sources: Collection[int], target: int) -> bool:
        try:
            rows = self._require().execute(_REACHES, (_id_array(sources), target))
            return rows.fetchone() is not None
        except sqlite3.DatabaseError as error:
            self._failed(error)

    def refs_of(self, oid: int, *, lazy: bool = True) -> Collection[int]:
        rows = self._require().execute(_REFS_OF if lazy else self._eager_refs_sql, (oid,))
        return [row[0] for row in rows]

    # -- keys -------------------------------------------------------------------------------

    def _checked(self, key: Any, oid: Any, seal: Any) -> None:
        """Raise :class:`CorruptionError` unless ``seal`` is that of binding ``key`` -> ``oid``."""
        if type(key) is not str or type(oid) is not int:    # a damaged row's types
            raise CorruptionError(self.path, f"the keys table holds {key!r} -> {oid!r}, not a "
                                  f"key and an object id", key=str(key))
        if self._sealed and seal != binding_seal(key, oid):
            raise CorruptionError(self.path, f"the binding of the key to object id {oid} does "
                                  f"not match its seal", key=key, object_id=oid)

    def get_meta(self, name: str) -> str | None:
        check_meta_name(name)
        try:
            row = self._require().execute(_GET_META, (name,)).fetchone()
        except sqlite3.DatabaseError as error:
            self._failed(error)
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        check_meta_name(name)
        try:
            self._require().execute(_SET_META, (name, value))
        except sqlite3.DatabaseError as error:
            self._failed(error)

    def get_key(self, key: str) -> int | None:
        if self._read_ahead is not None:
            row = self._ahead(key)
            return None if row is None else row[1]
        try:
            row = self._cursor.execute(self._keys_sql.get_key, (key,)).fetchone()
        except sqlite3.DatabaseError as error:
            self._failed(error)
        oid = None
        if row is not None:
            self._checked(key, *row)
            oid = row[0]
        if self._in_transaction:
            self._remember_binding(key, oid)
        return oid

    def get_item(self, key: str) -> tuple[int, bytes | None] | None:
        if self._read_ahead is not None:
            row = self._ahead(key)
            return None if row is None else self._read_ahead.item_of(row)
        try:
            row = self._cursor.execute(self._keys_sql.get_item, (key,)).fetchone()
        except sqlite3.DatabaseError as error:
            self._failed(error)
        if row is None:
            if self._in_transaction:
                self._remember_binding(key, None)
            return None
        oid, data, seal = row
        self._checked(key, oid, seal)
        if self._in_transaction:
            self._remember_binding(key, oid)
        return oid, data

    def _ahead(self, key: str) -> tuple[Any, ...] | None:
        """In a snapshot: ``key``'s row read ahead (see ReadAhead), its seal checked."""
        assert self._read_ahead is not None
        try:
            row = self._read_ahead.row(key)
        except sqlite3.DatabaseError as error:
            self._failed(error)
        if row is not None:
            self._checked(key, row[1], row[4])
        return row

    def _fetch_ahead(self, key: str, limit: int, before: str | None) -> list[tuple[Any, ...]]:
        if before is None:
            return self._require().execute(self._keys_sql.read_ahead, (key, limit)).fetchall()
        return self._require().execute(self._keys_sql.read_ahead_before,
                                       (key, before, limit)).fetchall()

    def _remember_binding(self, key: str, oid: int | None) -> None:
        self._remember_bindings(((key, oid),))

    def _remember_bindings(self, bindings: Iterable[tuple[str, int | None]]) -> None:
        """Note bindings the open write transaction read or wrote (see ``_tx_bindings``);
        past _KNOWN_BINDINGS_MAX, it starts again (a bulk load need not keep every key)."""
        known = self._tx_bindings
        if len(known) >= _KNOWN_BINDINGS_MAX:
            known.clear()
        known.update(bindings)

    def bind_key(self, key: str, oid: int) -> int | None:
        # While keys come new (a bulk load), one statement each: an insert that does nothing
        # if the key is bound. While they are bound already (rewrites), a read, then the write.
        seal = binding_seal(key, oid)
        cursor = self._cursor
        if self._binding_new_keys and key not in self._tx_bindings:
            try:
                if cursor.execute(_BIND_NEW_KEY, (key, oid, seal)).rowcount:
                    self._remember_binding(key, oid)
                    return None
            except sqlite3.DatabaseError as error:
                self._failed(error)
        previous = self._tx_bindings[key] if key in self._tx_bindings else self.get_key(key)
        self._binding_new_keys = previous is None
        if previous != oid:
            cursor.execute(_BIND_KEY, (key, oid, seal))
            self._remember_binding(key, oid)
        return previous

    def bind_keys(self, bindings: Sequence[tuple[str, int]]) -> set[int]:
        # A chunk at a time. While keys come new, one executemany of inserts that do nothing
        # for a bound key: if every row was inserted, that is all. Otherwise the chunk's
        # bindings are read (with one query, unless the transaction knows them all: a key
        # read, then rebound), then those that change are written. A lone binding (a single
        # set) goes by bind_key: one statement costs less than a batch of one.
        if len(bindings) == 1:
            return super().bind_keys(bindings)
        released: set[int] = set()
        known = self._tx_bindings
        try:
            for start in range(0, len(bindings), _BIND_CHUNK):
                chunk = bindings[start:start + _BIND_CHUNK]
                rows = [(key, oid, binding_seal(key, oid)) for key, oid in chunk]
                previous: dict[str, int] = {}
                if all(key in known for key, _ in chunk):
                    previous = {key: oid for key, _ in chunk
                                if (oid := known[key]) is not None}
                elif (self._binding_new_keys and self._cursor.executemany(
                        _BIND_NEW_KEY, rows).rowcount == len(rows)):
                    self._remember_bindings(chunk)
                    continue
                else:
                    query = self._keys_sql.get_keys + f" ({', '.join('?' * len(chunk))})"
                    for key, oid, seal in self._cursor.execute(query, [k for k, _ in chunk]):
                        self._checked(key, oid, seal)
                        previous[key] = oid
                changed = [row for row in rows if previous.get(row[0]) != row[1]]
                self._cursor.executemany(_BIND_KEY, changed)
                self._remember_bindings(chunk)
                released.update(previous[row[0]] for row in changed if row[0] in previous)
                self._binding_new_keys = len(previous) < len(chunk)
        except sqlite3.DatabaseError as error:
            self._failed(error)
        return released

    def unbind_key(self, key: str) -> int | None:
        oid = self._tx_bindings[key] if key in self._tx_bindings else self.get_key(key)
        if oid is not None:
            self._cursor.execute(_UNBIND_KEY, (key,))
            self._remember_binding(key, None)
        return oid

    def iter_keys(self) -> Iterator[str]:
        # Keyset pagination: each batch is a short statement of its own, so no read
        # transaction stays open between batches (it would hold back checkpoints) and
        # writes between batches are allowed.
        # Each binding's seal is checked: a damaged key would be listed, yet not found.
        for key, oid, seal in self._batches(self._keys_sql.first_keys,
                                            self._keys_sql.next_keys):
            self._checked(key, oid, seal)
            yield key

    def iter_items(self) -> Iterator[tuple[str, int, bytes | None]]:
        for key, oid, data, seal in self._batches(self._keys_sql.first_items,
                                                  self._keys_sql.next_items):
            self._checked(key, oid, seal)
            yield key, oid, data

    def _batches(self, first: str, following: str) -> Iterator[tuple[Any, ...]]:
        """The rows of ``first``, then of ``following`` after the last key, a batch at a time."""
        try:
            rows = self._require().execute(first, (_KEY_BATCH,)).fetchall()
            while rows:
                yield from rows
                if len(rows) < _KEY_BATCH:
                    return
                rows = self._require().execute(following, (rows[-1][0], _KEY_BATCH)).fetchall()
        except sqlite3.DatabaseError as error:
            self._failed(error)

    def count_keys(self) -> int:
        try:
            return self._require().execute(_COUNT_KEYS).fetchone()[0]
        except sqlite3.DatabaseError as error:
            self._failed(error)

    # -- transactions -----------------------------------------------------------------------

    def begin(self) -> None:
        if self.read_only:
            raise ReadOnlyError(self.path, "write")
        self._require()
        self._file_lock.lock(self.path)
        self._tx_bindings.clear()   # known only from this transaction's reads and writes
        try:
            self._cursor.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as error:
            self._file_lock.release()
            if _result_code(error) in _BUSY:
                # Only a process that ignores the lock file (not pstore) can cause this.
                raise LockTimeoutError(self.path, self._lock_timeout) from error
            self._failed(error)
        self._in_transaction = True

    def commit(self) -> None:
        committed = False
        try:
            self._require()
            self._settle_blobs()    # the blobs the records name are durable before them
            self._cursor.execute("COMMIT")
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
        self._tx_bindings.clear()
        if self._in_transaction:
            self._in_transaction = False
            try:
                self._end_blobs(committed)      # still under the lock: see BlobStore.end
            finally:
                self._file_lock.release()

    def change_marker(self) -> int:
        try:
            return self._cursor.execute(_DATA_VERSION).fetchone()[0]
        except sqlite3.DatabaseError as error:
            self._failed(error)

    def begin_read(self) -> None:
        # A deferred transaction takes its snapshot at its first read: read at once.
        # WAL gives readers a snapshot of their own, so writers do not wait for it.
        conn = self._require()
        try:
            conn.execute("BEGIN")
            conn.execute(_COUNT_TABLES).fetchone()
        except sqlite3.DatabaseError as error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._failed(error)
        self._read_ahead = ReadAhead(self._fetch_ahead, self.get_record)

    def end_read(self) -> None:
        self._read_ahead = None
        if self._conn is not None and self._conn.in_transaction and not self._in_transaction:
            self._conn.execute("COMMIT")

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
        try:
            conn.execute(_GC_REFS)
            deleted = conn.execute(_GC_RECORDS).rowcount
            conn.execute(_GC_BLOB_REFS)
            referenced = {row[0] for row in conn.execute(_REFERENCED_BLOBS)}
        except sqlite3.DatabaseError as error:
            self._failed(error)
        self.collect_blobs(referenced)
        return deleted

    def statistics(self) -> Statistics:
        records, record_bytes = self._require().execute(_RECORD_TOTALS).fetchone()
        blobs, blob_bytes = self._blob_usage()
        return Statistics(f"sqlite3 (SQLite {sqlite3.sqlite_version})", self._check_format(),
                          records, record_bytes, blobs, blob_bytes)

    def vacuum(self) -> int:
        # VACUUM cannot run in a transaction, so the write lock is taken by hand. In
        # WAL mode it writes the new pages to the log: readers keep their snapshots, and
        # the file shrinks at the checkpoint after it.
        if self.read_only:
            raise ReadOnlyError(self.path, "vacuum")
        conn = self._require()
        before = size_of(self.path, self.path + "-wal")
        if not self._file_lock.acquire():
            raise LockTimeoutError(self.path, self._lock_timeout)
        try:
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            self._file_lock.release()
        return before - size_of(self.path, self.path + "-wal")

    def key_lock(self, key: str, timeout: float) -> AbstractContextManager[None]:
        return key_lock_file(self.path, key, timeout)

    def after_fork(self) -> None:
        if self._conn is None:
            return
        _INHERITED.append(self._conn)
        self._file_lock.abandon()
        self._conn = None
        self._cursor = self._closed_cursor
        self._in_transaction = False
        self._read_ahead = None
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
            self._cursor = self._closed_cursor
            self._read_ahead = None
            self._next_oid = self._block_end = 0    # new_oid then needs the connection
            self._close_blobs()
            self._file_lock.close()
            conn.close()
