"""The PostgreSQL backend: one store in one schema of a server database, shared by many machines.

Opened with a libpq connection URI plus a ``store`` parameter naming the store
(default ``pstore``): ``postgresql://user@host:5432/dbname?store=NAME``; Unix
sockets through ``host=/path``. The store's tables live in the schema of that
name, so one database holds many stores. ``docs/backends.md`` describes the
tables, the locking and what a DBA needs; psycopg 3 (``pip install
pstore[postgresql]``) is imported only when such a store is opened.

Choices, and why:

* **One write lock per store, a transaction-level advisory lock** taken by
  :meth:`PostgreSQLBackend.begin`: writers are serialized as on SQLite, so the
  store's read-modify-write transactions never conflict and never need a retry
  loop (SERIALIZABLE would make every Store transaction retryable, which the
  Store API cannot do for user code); readers take no lock at all (MVCC). The
  server releases the lock when the transaction ends for any reason, a killed
  client's included. ``lock_timeout`` is PostgreSQL's ``lock_timeout``; a
  timeout names the session holding the lock (from ``pg_stat_activity``).
* **A commit counter** (table ``state``), incremented by each commit in the
  commit's own round trip, is the change marker; this connection's own commits
  are subtracted, so only another connection's commit changes it. Inside a write
  transaction the marker is known without a query (no one else can commit).
* **Refs as arrays in the record's row** (``refs``, ``lazy``, ``blobs``): a record is
  written by one statement, queued and sent pipelined with the others of its
  transaction (with the commit, if nothing reads records before); a GIN index
  answers "is this object referenced"; reachability and gc are recursive queries
  run by the server.
* **Blobs as chunked bytea rows** (``blob_chunks``, 1 MiB each, stored
  uncompressed), not large objects: they live in the store's schema (dropped,
  granted and dumped with it, no orphan large objects to unlink), are
  transactional like the records, and stream with ordinary queries. A blob is
  written a chunk at a time (never whole in memory), named at the end by the
  same digest as the file backends' blobs, and dropped again if equal bytes are
  stored already. Loading streams the chunks in one query into one buffer of
  the blob's size: the blob is in memory once, plus one chunk in flight.
"""

from __future__ import annotations

import errno
import hashlib
import re
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from ..errors import (ClosedError, ConnectionLostError, FormatError, LockTimeoutError,
                      ReadOnlyError, ServerLockTimeoutError)
from .base import Backend
from .blobs import _TreeHasher  # the digest of blobs.py, over a stream of chunks

try:
    import psycopg
    from psycopg import errors as pg_errors
except ImportError:     # an optional dependency: the error is raised when a store is opened
    psycopg = None  # type: ignore[assignment]

__all__ = ["PostgreSQLBackend", "FORMAT_NAME", "FORMAT_VERSION", "DEFAULT_STORE", "SCHEMES",
           "parse_location"]

#: URL schemes that name a PostgreSQL store.
SCHEMES = ("postgresql", "postgres")
#: The store a URL without a ``store`` parameter names.
DEFAULT_STORE = "pstore"
#: What the meta table's 'format' row holds in every pstore schema.
FORMAT_NAME = "pstore-postgresql"
#: The newest version of the tables this code reads and the one it creates.
FORMAT_VERSION = 1

#: The first key of every store's advisory lock ("pStr"); the second is derived from its name.
LOCK_CLASS = 0x70537472
#: Bytes per row of blob_chunks.
BLOB_CHUNK = 1 << 20
#: How many object ids one call of the sequence reserves (its increment).
OID_BLOCK = 1000
#: put_record queues up to this many records, or this many bytes of them, before sending them.
QUEUE_RECORDS = 1000
QUEUE_BYTES = 8 << 20
#: How many keys one query of iter_keys / iter_items fetches.
KEY_BATCH = 1000

# Lowercase so that the unquoted name a DBA types in psql is the same schema.
_STORE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# Statements take the schema as {s} (a quoted identifier, substituted once per backend).
_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE {s}.meta (name text PRIMARY KEY, value text NOT NULL);
CREATE TABLE {s}.state (one boolean PRIMARY KEY DEFAULT true CHECK (one),
                        commits bigint NOT NULL);
CREATE SEQUENCE {s}.oids INCREMENT BY {oid_block};
CREATE TABLE {s}.records (oid bigint PRIMARY KEY, data bytea NOT NULL,
                          refs bigint[] NOT NULL, lazy bigint[] NOT NULL,
                          blobs text[] NOT NULL);
CREATE INDEX records_by_ref ON {s}.records USING gin (refs);
CREATE TABLE {s}.keys (key bytea PRIMARY KEY, oid bigint NOT NULL);
CREATE INDEX keys_by_oid ON {s}.keys (oid);
CREATE TABLE {s}.blobs (id bigserial PRIMARY KEY, name text UNIQUE, size bigint);
CREATE TABLE {s}.blob_chunks (blob bigint NOT NULL REFERENCES {s}.blobs ON DELETE CASCADE,
                              seq integer NOT NULL, data bytea NOT NULL,
                              PRIMARY KEY (blob, seq));
ALTER TABLE {s}.blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
INSERT INTO {s}.meta VALUES ('format', '{format_name}'), ('version', '{format_version}');
INSERT INTO {s}.state (commits) VALUES (0);
"""
_EMPTY = """
DELETE FROM {s}.keys; DELETE FROM {s}.records; DELETE FROM {s}.blobs;
"""
_FIND = "SELECT to_regnamespace(%(schema)s) IS NOT NULL, to_regclass(%(meta)s) IS NOT NULL"
_SCHEMA_TABLES = ("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                  " WHERE n.nspname = %s")
_META = "SELECT name, value FROM {s}.meta WHERE name IN ('format', 'version')"
# Taking the lock and reading the counter: one round trip, in the simple query protocol.
_BEGIN = "BEGIN; SELECT pg_advisory_xact_lock({lock_class}, {lock_key}); SELECT commits FROM {s}.state"
_LOCK = "BEGIN; SELECT pg_advisory_xact_lock({lock_class}, {lock_key})"
_COUNT_COMMIT = "UPDATE {s}.state SET commits = commits + 1"
_COMMITS = "SELECT commits FROM {s}.state"
_LOCK_HOLDER = """
SELECT a.pid, a.application_name, a.client_addr::text FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {lock_class}::oid
  AND l.objid = {lock_objid}::oid AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
LIMIT 1
"""
_NEXT_OIDS = "SELECT nextval(%s::regclass)"
_GET_RECORD = "SELECT data FROM {s}.records WHERE oid = %s"
_PUT_RECORD = """
INSERT INTO {s}.records (oid, data, refs, lazy, blobs)
VALUES (%s, %b, %s::bigint[], %s::bigint[], %s::text[])
ON CONFLICT (oid) DO UPDATE
SET data = EXCLUDED.data, refs = EXCLUDED.refs, lazy = EXCLUDED.lazy, blobs = EXCLUDED.blobs
"""
_DELETE_RECORD = "DELETE FROM {s}.records WHERE oid = %s"
_EXISTING = "SELECT oid FROM {s}.records WHERE oid = ANY(%s::bigint[])"
_IS_REFERENCED = ("SELECT EXISTS (SELECT 1 FROM {s}.keys WHERE oid = %(oid)s)"
                  " OR EXISTS (SELECT 1 FROM {s}.records WHERE refs @> ARRAY[%(oid)s::bigint])")
_REFS_OF = "SELECT refs FROM {s}.records WHERE oid = %s"
# A recursive query is evaluated as its rows are asked for: EXISTS stops at the target.
_REACHES = """
WITH RECURSIVE reach (oid) AS (
    SELECT unnest(%(sources)s::bigint[])
    UNION
    SELECT ref FROM reach JOIN {s}.records r ON r.oid = reach.oid,
                    unnest(r.refs) AS ref WHERE ref <> ALL (r.lazy))
SELECT EXISTS (SELECT 1 FROM reach WHERE oid = %(target)s)
"""
_GC_RECORDS = """
WITH RECURSIVE live (oid) AS (
    SELECT oid FROM {s}.keys
    UNION
    SELECT ref FROM live JOIN {s}.records r ON r.oid = live.oid, unnest(r.refs) AS ref)
DELETE FROM {s}.records r WHERE NOT EXISTS (SELECT 1 FROM live WHERE live.oid = r.oid)
"""
# Deleting a blob's row deletes its chunks (ON DELETE CASCADE).
_GC_BLOBS = """
WITH used AS (SELECT DISTINCT unnest(blobs) AS name FROM {s}.records)
DELETE FROM {s}.blobs b WHERE NOT EXISTS (SELECT 1 FROM used WHERE used.name = b.name)
"""
_NEW_BLOB = "INSERT INTO {s}.blobs DEFAULT VALUES RETURNING id"
_PUT_CHUNK = "INSERT INTO {s}.blob_chunks (blob, seq, data) VALUES (%s, %s, %b)"
_FIND_BLOB = "SELECT id FROM {s}.blobs WHERE name = %s"
_NAME_BLOB = "UPDATE {s}.blobs SET name = %s, size = %s WHERE id = %s"
_DROP_BLOB = "DELETE FROM {s}.blobs WHERE id = %s"
_LOAD_BLOB = ("SELECT b.size, c.data FROM {s}.blobs b LEFT JOIN {s}.blob_chunks c ON c.blob = b.id"
              " WHERE b.name = %s ORDER BY c.seq")
_BLOB_SIZE = "SELECT size FROM {s}.blobs WHERE name = %s"
_BLOB_CHUNK = ("SELECT c.data FROM {s}.blobs b JOIN {s}.blob_chunks c ON c.blob = b.id"
               " WHERE b.name = %s AND c.seq = %s")
_BLOB_NAMES = "SELECT name FROM {s}.blobs WHERE name IS NOT NULL"
_GET_KEY = "SELECT oid FROM {s}.keys WHERE key = %b"
_GET_ITEM = ("SELECT k.oid, r.data FROM {s}.keys k LEFT JOIN {s}.records r ON r.oid = k.oid"
             " WHERE k.key = %b")
# Every part of one statement sees the same snapshot: "old" is the binding before the upsert.
_BIND_KEY = """
WITH old AS (SELECT oid FROM {s}.keys WHERE key = %(key)b),
     new AS (INSERT INTO {s}.keys (key, oid) VALUES (%(key)b, %(oid)s)
             ON CONFLICT (key) DO UPDATE SET oid = EXCLUDED.oid WHERE keys.oid <> EXCLUDED.oid)
SELECT oid FROM old
"""
_UNBIND_KEY = "DELETE FROM {s}.keys WHERE key = %b RETURNING oid"
_FIRST_KEYS = "SELECT key FROM {s}.keys ORDER BY key LIMIT %s"
_NEXT_KEYS = "SELECT key FROM {s}.keys WHERE key > %b ORDER BY key LIMIT %s"
_ITEMS = "SELECT k.key, k.oid, r.data FROM {s}.keys k LEFT JOIN {s}.records r ON r.oid = k.oid"
_FIRST_ITEMS = _ITEMS + " ORDER BY k.key LIMIT %s"
_NEXT_ITEMS = _ITEMS + " WHERE k.key > %b ORDER BY k.key LIMIT %s"
_COUNT_KEYS = "SELECT count(*) FROM {s}.keys"


def parse_location(location: str) -> tuple[dict[str, Any], str, str]:
    """Split a store URL into (libpq connection parameters, store name, the URL to show).

    The URL to show is ``location`` with any password removed, for ``path``,
    ``repr`` and error messages. Raises ``ValueError`` for a URL that is not a
    PostgreSQL URI or names an invalid store.
    """
    parts = urlsplit(location)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"not a PostgreSQL URL (postgresql://...): {_redact(parts)!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    stores = [value for name, value in query if name == "store"]
    if len(stores) > 1:
        raise ValueError(f"more than one store parameter in {_redact(parts)!r}")
    store = stores[0] if stores else DEFAULT_STORE
    if not _STORE_NAME.fullmatch(store) or store.startswith("pg_"):
        raise ValueError(f"store name {store!r} in {_redact(parts)!r}: use 1 to 63 lowercase "
                         "letters, digits and underscores, not starting with a digit or pg_")
    rest = _unsplit(parts, parts.netloc, [(name, value) for name, value in query
                                          if name != "store"])
    try:
        params = psycopg.conninfo.conninfo_to_dict(rest)
    except psycopg.ProgrammingError as error:
        raise ValueError(f"not a valid PostgreSQL URL {_redact(parts)!r}: "
                         f"{_scrub(str(error), parts.password)}") from None
    return params, store, _redact(parts) if _has_password(parts) else location


def _has_password(parts: Any) -> bool:
    return parts.password is not None or any(
        name == "password" for name, _ in parse_qsl(parts.query, keep_blank_values=True))


def _redact(parts: Any) -> str:
    """The URL of ``parts`` without its password (in the user part or the query)."""
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}@{host}"
    query = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True)
             if name != "password"]
    return _unsplit(parts, netloc, query)


def _unsplit(parts: Any, netloc: str, query: list[tuple[str, str]]) -> str:
    """``parts`` as a URL again, with ``netloc`` and ``query``; "//" kept when netloc is empty."""
    encoded = urlencode(query, safe="/")
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{encoded}" if encoded else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def _scrub(message: str, password: str | None) -> str:
    return message.replace(password, "***") if password else message


class _BlobBuffer(bytearray):
    """A loaded blob's bytes: a bytearray that can be weakly referenced, so the store can
    tell a re-stored buffer of it (pstore/store/mapped.py)."""


def _lock_key(store: str) -> int:
    """The second key of the store's advisory lock: a signed 32-bit digest of its name.

    Two names with one digest only make their writers wait for each other.
    """
    digest = hashlib.blake2b(store.encode(), digest_size=4, person=b"pstore-lock").digest()
    return int.from_bytes(digest, "big", signed=True)


def _require_psycopg() -> None:
    if psycopg is None:
        raise ModuleNotFoundError("the PostgreSQL backend needs psycopg 3: "
                                  "pip install pstore[postgresql]", name="psycopg")


class PostgreSQLBackend(Backend):
    """A store in the schema ``store`` of a PostgreSQL database.

    ``path`` is the URL (see :func:`parse_location`); ``path`` as kept and shown
    has no password. Flags: 'c' creates the schema and its tables if missing, 'n'
    also empties the store (under the write lock), 'w' requires the store, 'r'
    requires it and writes nothing (the session is read-only on the server too).
    ``fsync=True`` asks for ``synchronous_commit = on`` whatever the server's
    default; otherwise the server's settings decide durability (by default a
    commit that returned survives a crash of the server too).

    A connection the server dropped raises
    :class:`~pstore.errors.ConnectionLostError`; the next call connects again
    (the transaction under way, if any, is lost: the server rolled it back).
    """

    def __init__(self, path: str, flag: str, *, lock_timeout: float, fsync: bool) -> None:
        _require_psycopg()
        self._params, self.store_name, self.path = parse_location(path)
        self._password = self._params.get("password")
        self.read_only = flag == "r"
        self._lock_timeout = lock_timeout
        self._fsync = fsync
        schema = psycopg.sql.Identifier(self.store_name).as_string(None)
        self._schema = schema
        lock_key = _lock_key(self.store_name)
        self._sql = {name: statement.format(
            # lock_objid: the key as pg_locks shows it (an oid, unsigned)
            s=schema, lock_class=LOCK_CLASS, lock_key=lock_key, lock_objid=lock_key & 0xFFFFFFFF,
            oid_block=OID_BLOCK, format_name=FORMAT_NAME, format_version=FORMAT_VERSION)
            for name, statement in _STATEMENTS.items()}
        self._conn: Any = None
        self._closed = False
        self._in_transaction = False
        self._next_oid = self._block_end = 0
        self._queued: list[tuple[Any, ...]] = []    # put_record rows not sent yet
        self._queued_bytes = 0
        # change_marker() = the commit counter minus this connection's own commits.
        self._own_commits = 0
        self._commits_at_begin = 0
        self._connect()
        try:
            self._open_store(flag)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r}>"

    # -- connecting -------------------------------------------------------------------------

    def _connect(self) -> None:
        params = dict(self._params)
        params.setdefault("application_name", "pstore")
        params.setdefault("connect_timeout", "10")
        # Session settings travel with the startup packet: no round trip of their own.
        settings = [f"-c lock_timeout={max(1, round(self._lock_timeout * 1000))}"]
        if self.read_only:
            settings.append("-c default_transaction_read_only=on")
        if self._fsync:
            settings.append("-c synchronous_commit=on")
        params["options"] = " ".join(filter(None, [params.get("options"), *settings]))
        try:
            self._conn = psycopg.connect(psycopg.conninfo.make_conninfo("", **params),
                                         autocommit=True, prepare_threshold=0)
        except psycopg.OperationalError as error:
            raise ConnectionLostError(self.path, self._reason(error)) from None
        self._cursor = self._conn.cursor()

    def _reason(self, error: BaseException) -> str:
        return _scrub(str(error).strip(), self._password)

    def _connection(self) -> Any:
        """The open connection, connecting again if the last one was lost between transactions."""
        if self._closed:
            raise ClosedError(self.path)
        if self._conn is None or self._conn.closed:
            self._connect()
        return self._conn

    def _lost(self, error: BaseException) -> ConnectionLostError:
        """The error for a lost connection; the next call reconnects."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._in_transaction = False
        self._queued.clear()
        return ConnectionLostError(self.path, self._reason(error))

    def _call(self, action: Any) -> Any:
        """``action()`` on the open connection; a lost connection becomes ConnectionLostError."""
        conn = self._connection()
        try:
            return action()
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            if conn.broken or conn.closed:
                raise self._lost(error) from None
            raise

    def _execute(self, name: str, params: Any = None) -> Any:
        """Run statement ``name`` with ``params``; return the cursor holding its rows.

        The queued records are sent first if the statement reads or changes records.
        """
        if self._queued and name in _SEES_RECORDS:
            self._flush()
        return self._call(lambda: self._cursor.execute(self._sql[name], params))

    def _flush(self) -> None:
        """Send the queued records (executemany pipelines them: one round trip)."""
        rows, self._queued = self._queued, []
        self._queued_bytes = 0
        self._call(lambda: self._cursor.executemany(self._sql["put_record"], rows))

    def _script(self, name: str) -> Any:
        """Run the statements ``name`` (no parameters) in one round trip; return the cursor."""
        return self._call(lambda: self._cursor.execute(self._sql[name], prepare=False))

    def _one(self, name: str, params: Any = None) -> Any:
        """The first column of the first row of statement ``name``, or None without a row."""
        row = self._execute(name, params).fetchone()
        return None if row is None else row[0]

    # -- opening ----------------------------------------------------------------------------

    def _open_store(self, flag: str) -> None:
        if flag == "n" or (flag == "c" and not self._exists()):
            self._lock("lock")    # the counter may not exist yet: not begin()
            try:
                # Again under the lock: another process may have created it meanwhile.
                if not self._exists():
                    self._script("create")
                elif flag == "n":
                    self._script("empty")
                self.commit()
            except BaseException:
                self.rollback()
                raise
        elif flag in ("r", "w") and not self._exists():
            raise FileNotFoundError(errno.ENOENT, f"no pstore store {self.store_name!r} in "
                                                  "this database", self.path)

    def _exists(self) -> bool:
        """Whether the store's tables exist (checking their format); FormatError for a schema
        that holds something else."""
        has_schema, has_meta = self._execute("find", {
            "schema": self._schema, "meta": f"{self._schema}.meta"}).fetchone()
        if not has_meta:
            if has_schema and self._one("schema_tables", (self.store_name,)):
                raise FormatError(self.path, f"schema {self.store_name!r} holds tables that are "
                                             "not a pstore store")
            return False
        try:
            meta = dict(self._execute("meta").fetchall())
        except psycopg.errors.UndefinedColumn:
            raise FormatError(self.path, "its meta table is not pstore's") from None
        if meta.get("format") != FORMAT_NAME or not meta.get("version", "").isdigit():
            raise FormatError(self.path, "its meta table has no pstore format rows")
        if int(meta["version"]) > FORMAT_VERSION:
            raise FormatError(self.path, f"format version {meta['version']} was written by a "
                                         f"newer pstore; this one reads up to {FORMAT_VERSION}")
        return True

    # -- records ----------------------------------------------------------------------------

    def new_oid(self) -> int:
        if self._next_oid == self._block_end:
            # A sequence never hands a value out twice, even when the transaction that
            # asked rolls back: the block stays this connection's.
            first = self._one("next_oids", (f"{self._schema}.oids",))
            self._next_oid, self._block_end = first, first + OID_BLOCK
        oid = self._next_oid
        self._next_oid = oid + 1
        return oid

    def get_record(self, oid: int) -> bytes | None:
        return self._one("get_record", (oid,))

    def put_record(self, oid: int, data: bytes, refs: Collection[int],
                   *, lazy_refs: Collection[int] = (), blobs: Collection[str] = ()) -> None:
        # Queued, and sent many at a time (one pipelined round trip) when a statement that
        # sees records runs, at commit, or when the queue is full.
        self._queued.append((oid, data, list(dict.fromkeys(refs)),
                             list(dict.fromkeys(lazy_refs)), list(dict.fromkeys(blobs))))
        self._queued_bytes += len(data)
        if len(self._queued) >= QUEUE_RECORDS or self._queued_bytes >= QUEUE_BYTES:
            self._flush()

    def delete_record(self, oid: int) -> None:
        self._execute("delete_record", (oid,))

    def existing(self, oids: Collection[int]) -> set[int]:
        if not oids:
            return set()
        return {row[0] for row in self._execute("existing", (list(oids),))}

    def is_referenced(self, oid: int) -> bool:
        return self._one("is_referenced", {"oid": oid})

    def refs_of(self, oid: int) -> list[int]:
        """The object ids record ``oid`` refers to, lazily or not ([] without a record)."""
        return self._one("refs_of", (oid,)) or []

    def reaches(self, sources: Collection[int], target: int) -> bool:
        return self._one("reaches", {"sources": list(sources), "target": target})

    # -- blobs ------------------------------------------------------------------------------

    def put_blob(self, chunks: Iterable[Any]) -> str:
        blob = self._one("new_blob")
        hasher = _TreeHasher()
        size = seq = 0
        pending = bytearray()   # small pieces gathered into one row

        def send(piece: Any) -> None:
            nonlocal seq
            self._execute("put_chunk", (blob, seq, piece))
            seq += 1

        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                hasher.update(view)
                size += len(view)
                while view:
                    if not pending and len(view) >= BLOB_CHUNK:
                        send(view[:BLOB_CHUNK])
                        view = view[BLOB_CHUNK:]
                        continue
                    take = BLOB_CHUNK - len(pending)
                    pending += view[:take]
                    view = view[take:]
                    if len(pending) == BLOB_CHUNK:
                        send(pending)
                        pending.clear()
            if pending:
                send(pending)
            name = hasher.digest()
        except BaseException:
            hasher.close()
            if self._in_transaction:    # the chunks written so far go too
                self._execute("drop_blob", (blob,))
            raise
        if self._one("find_blob", (name,)) is not None:
            self._execute("drop_blob", (blob,))     # the same bytes are stored already
        else:
            self._execute("name_blob", (name, size, blob))
        return name

    def get_blob(self, name: str, size: int, *, writable: bool) -> Any:
        conn = self._connection()
        buffer = _BlobBuffer(size)
        view = memoryview(buffer)
        filled = 0
        found = False
        try:
            # One query streamed a row (chunk) at a time: each chunk is copied once, into
            # the buffer, while the next one arrives.
            with conn.cursor() as cursor:
                for stored_size, data in cursor.stream(self._sql["load_blob"], (name,),
                                                       binary=True):
                    found = True
                    if stored_size != size:
                        raise FormatError(self.path, f"blob {name} holds {stored_size} bytes, "
                                                     f"its record says {size}")
                    if data is None:
                        continue
                    if filled + len(data) > size:
                        raise FormatError(self.path, f"blob {name} has more chunks than "
                                                     f"its size, {size} bytes")
                    view[filled:filled + len(data)] = data
                    filled += len(data)
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            if conn.broken or conn.closed:
                raise self._lost(error) from None
            raise
        if not found:
            raise FormatError(self.path, f"blob {name} is missing")
        if filled != size:
            raise FormatError(self.path, f"blob {name} has chunks of {filled} bytes, "
                                         f"its size is {size}")
        return buffer if writable else view.toreadonly()

    def has_blob(self, name: str, size: int) -> bool:
        return self._one("blob_size", (name,)) == size

    def read_blob(self, name: str) -> Iterator[bytes]:
        # A query per chunk, so that the connection is free between chunks.
        if self._one("blob_size", (name,)) is None:
            raise FormatError(self.path, f"blob {name} is missing")
        seq = 0
        while (data := self._one("blob_chunk", (name, seq))) is not None:
            yield data
            seq += 1

    def blob_names(self) -> set[str]:
        """The name of every stored blob."""
        return {row[0] for row in self._execute("blob_names")}

    # -- keys -------------------------------------------------------------------------------

    def get_key(self, key: str) -> int | None:
        return self._one("get_key", (key.encode(),))

    def get_item(self, key: str) -> tuple[int, bytes | None] | None:
        return self._execute("get_item", (key.encode(),)).fetchone()

    def bind_key(self, key: str, oid: int) -> int | None:
        return self._one("bind_key", {"key": key.encode(), "oid": oid})

    def unbind_key(self, key: str) -> int | None:
        return self._one("unbind_key", (key.encode(),))

    def iter_keys(self) -> Iterator[str]:
        # Keyset pagination: each batch is a statement of its own, so no transaction stays
        # open between batches and writes between them are allowed.
        batch = [row[0] for row in self._execute("first_keys", (KEY_BATCH,)).fetchall()]
        while batch:
            yield from (key.decode() for key in batch)
            if len(batch) < KEY_BATCH:
                return
            batch = [row[0] for row in
                     self._execute("next_keys", (batch[-1], KEY_BATCH)).fetchall()]

    def iter_items(self) -> Iterator[tuple[str, int, bytes | None]]:
        rows = self._execute("first_items", (KEY_BATCH,)).fetchall()
        while rows:
            yield from ((key.decode(), oid, data) for key, oid, data in rows)
            if len(rows) < KEY_BATCH:
                return
            rows = self._execute("next_items", (rows[-1][0], KEY_BATCH)).fetchall()

    def count_keys(self) -> int:
        return self._one("count_keys")

    # -- transactions -----------------------------------------------------------------------

    def begin(self) -> None:
        if self.read_only:
            raise ReadOnlyError(self.path, "write")
        cursor = self._lock("begin")
        # The results of BEGIN, of the lock and of the counter, in order.
        while cursor.nextset():
            pass
        self._commits_at_begin = cursor.fetchone()[0]

    def _lock(self, script: str) -> Any:
        """Run ``script``, which begins a transaction and takes the write lock; return its cursor."""
        try:
            cursor = self._script(script)
        except pg_errors.LockNotAvailable:
            self._script("rollback")
            raise self._lock_timeout_error() from None
        except BaseException:
            if self._conn is not None and not self._conn.closed:
                self._script("rollback")
            raise
        self._in_transaction = True
        return cursor

    def _lock_timeout_error(self) -> LockTimeoutError:
        holder = self._execute("lock_holder").fetchone()
        if holder is None:      # released meanwhile
            return LockTimeoutError(self.path, self._lock_timeout)
        pid, application, address = holder
        return ServerLockTimeoutError(self.path, self._lock_timeout, pid, application,
                                      address or "local socket")

    def commit(self) -> None:
        rows, self._queued = self._queued, []
        self._queued_bytes = 0

        def send() -> None:
            # The queued records, the counter and COMMIT: one round trip.
            with self._conn.pipeline():
                if rows:
                    self._cursor.executemany(self._sql["put_record"], rows)
                self._cursor.execute(self._sql["count_commit"])
                self._cursor.execute("COMMIT")
        try:
            self._call(send)
        except BaseException:
            self.rollback()     # a failed statement leaves the transaction open, aborted
            raise
        self._in_transaction = False
        self._own_commits += 1

    def rollback(self) -> None:
        self._queued.clear()
        if not self._in_transaction:
            return
        self._in_transaction = False
        if self._conn is not None and not self._conn.closed:
            self._script("rollback")

    def change_marker(self) -> int:
        if self._in_transaction:    # the write lock is held: no one else commits
            return self._commits_at_begin - self._own_commits
        return self._one("commits") - self._own_commits

    # -- coordination -----------------------------------------------------------------------

    @contextmanager
    def key_lock(self, key: str, timeout: float) -> Iterator[None]:
        """A session-level advisory lock on a 64-bit digest of the store and the key, on a
        connection of its own (so the store's connection stays free): the server releases
        it when that connection ends, a killed holder included."""
        if self._closed:
            raise ClosedError(self.path)
        digest = hashlib.blake2b(f"{self.store_name}\0{key}".encode("utf-8", "surrogatepass"),
                                 digest_size=8, person=b"pstore-keylock").digest()
        params = dict(self._params)
        params.setdefault("application_name", "pstore key lock")
        waits = 0 if timeout == float("inf") else max(1, round(timeout * 1000))
        params["options"] = " ".join(filter(None, [params.get("options"),
                                                   f"-c lock_timeout={waits}"]))
        try:
            conn = psycopg.connect(psycopg.conninfo.make_conninfo("", **params), autocommit=True)
        except psycopg.OperationalError as error:
            raise ConnectionLostError(self.path, self._reason(error)) from None
        try:
            try:
                conn.execute("SELECT pg_advisory_lock(%s)",
                             (int.from_bytes(digest, "big", signed=True),))
            except pg_errors.LockNotAvailable:
                raise LockTimeoutError(self.path, timeout) from None
            yield
        finally:
            conn.close()

    # -- maintenance ------------------------------------------------------------------------

    def gc(self) -> int:
        deleted = self._execute("gc_records").rowcount
        self._execute("gc_blobs")
        return deleted

    def after_fork(self) -> None:
        # The parent's socket is the parent's: dropped unclosed (closing it would end the
        # parent's session), and the child connects anew. The parent's oid block is too.
        if self._conn is not None:
            _INHERITED.append(self._conn)
        self._conn = None
        self._in_transaction = False
        self._queued.clear()
        self._next_oid = self._block_end = 0
        if not self._closed:
            self._connect()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self._in_transaction and not conn.closed:
                conn.execute("ROLLBACK")
        except psycopg.Error:
            pass    # the server rolls back a transaction whose connection ends
        finally:
            self._in_transaction = False
            conn.close()


_STATEMENTS = {
    "create": _SCHEMA, "empty": _EMPTY, "find": _FIND, "schema_tables": _SCHEMA_TABLES,
    "meta": _META, "begin": _BEGIN, "lock": _LOCK,
    "count_commit": _COUNT_COMMIT, "rollback": "ROLLBACK",
    "commits": _COMMITS, "lock_holder": _LOCK_HOLDER, "next_oids": _NEXT_OIDS,
    "get_record": _GET_RECORD, "put_record": _PUT_RECORD, "delete_record": _DELETE_RECORD,
    "existing": _EXISTING, "is_referenced": _IS_REFERENCED, "refs_of": _REFS_OF,
    "reaches": _REACHES, "gc_records": _GC_RECORDS, "gc_blobs": _GC_BLOBS,
    "new_blob": _NEW_BLOB, "put_chunk": _PUT_CHUNK, "find_blob": _FIND_BLOB,
    "name_blob": _NAME_BLOB, "drop_blob": _DROP_BLOB, "load_blob": _LOAD_BLOB,
    "blob_size": _BLOB_SIZE, "blob_chunk": _BLOB_CHUNK, "blob_names": _BLOB_NAMES,
    "get_key": _GET_KEY, "get_item": _GET_ITEM, "bind_key": _BIND_KEY,
    "unbind_key": _UNBIND_KEY, "first_keys": _FIRST_KEYS, "next_keys": _NEXT_KEYS,
    "first_items": _FIRST_ITEMS, "next_items": _NEXT_ITEMS, "count_keys": _COUNT_KEYS,
}

# The statements that read or change records: queued records are sent before them.
_SEES_RECORDS = frozenset([
    "get_record", "delete_record", "existing", "is_referenced", "refs_of", "reaches",
    "gc_records", "gc_blobs", "get_item", "first_items", "next_items"])

# Connections inherited from a parent process, kept referenced forever: closing one in the
# child would send the server a terminate message for the parent's session.
_INHERITED: list[Any] = []
