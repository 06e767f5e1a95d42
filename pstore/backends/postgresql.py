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
* **Refs as arrays in the record's row** (``refs``, ``lazy``, ``blobs``); a GIN index
  (of the records that refer to something, without a pending list, which every
  search would scan) answers "is this object referenced"; reachability and gc are
  recursive queries run by the server.
* **Changes are queued** (records, key bindings, deletions) and sent with the next
  query or the commit, in the same round trip, as one statement of arrays per run
  of changes of one kind.
* **A write transaction knows what it read and wrote** (:class:`_Known`): no other
  connection commits while it holds the lock, so a key or record it has seen is
  answered from memory, ``bind_key`` learns the bindings of the next keys
  with the one it needs (16 at first in a transaction, twice as many each time after), and
  ``is_referenced`` asks about all the ids the
  transaction's keys released in one query. What it knows is kept for the next
  write transaction if the counter says no one else committed meanwhile, and
  dropped on rollback. Reads outside a transaction always ask the server.
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

import bisect
import errno
import hashlib
import itertools
import re
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from ..blob_names import BlobHasher  # the blob names of the file backends, over a stream of chunks
from ..errors import (
    ClosedError,
    ConnectionLostError,
    FormatError,
    LockTimeoutError,
    ReadOnlyError,
    ServerLockTimeoutError,
)
from .base import (
    READ_AHEAD_RECORD_MAX,
    Backend,
    ReadAhead,
    Statistics,
    check_meta_name,
    check_reserved,
)

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
#: How many keys one query of iter_keys / iter_items fetches, and the most bindings bind_key
#: learns with one query (the key asked for and those after it).
KEY_BATCH = 1000
#: How many bindings bind_key learns with the first query of a transaction; each further
#: query learns twice as many (up to KEY_BATCH): a single set asks for few rows, a bulk
#: write soon for many.
FIRST_KEY_BATCH = 16
#: How many records referring to an object is_referenced remembers (see _released).
REFERRERS = 8
#: What a write transaction remembers of the store (see _Known): at most this many keys,
#: and records of this many bytes; beyond that it forgets (and asks the server again).
KNOWN_KEYS = 200_000
KNOWN_BYTES = 64 << 20

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
CREATE INDEX records_by_ref ON {s}.records USING gin (refs) WITH (fastupdate = off)
    WHERE refs <> '{{}}';
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
_BEGIN = ("BEGIN; SELECT pg_advisory_xact_lock({lock_class}, {lock_key}); "
          "SELECT commits FROM {s}.state")
_LOCK = "BEGIN; SELECT pg_advisory_xact_lock({lock_class}, {lock_key})"
_COUNT_COMMIT = "UPDATE {s}.state SET commits = commits + 1"
_COMMITS = "SELECT commits FROM {s}.state"
# A snapshot: every statement until COMMIT sees the state at its first one (the counter's).
_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT commits FROM {s}.state"
_LOCK_HOLDER = """
SELECT a.pid, a.application_name, a.client_addr::text FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = {lock_class}::oid
  AND l.objid = {lock_objid}::oid AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
LIMIT 1
"""
_NEXT_OIDS = "SELECT nextval(%s::regclass)"
# The sequence's next value made at least %(next)s; last_value is the start of the last block
# handed out (or, before any, the first value).
_RESERVE_IDS = """
SELECT setval(%(sequence)s::regclass, GREATEST(%(next)s,
              CASE WHEN is_called THEN last_value + {oid_block} ELSE last_value END), false)
FROM {s}.oids
"""
_RECORDS = "SELECT oid, data, refs FROM {s}.records WHERE oid > %s ORDER BY oid LIMIT %s"
_EAGER_REFS_OF = ("SELECT ARRAY(SELECT unnest(refs) EXCEPT SELECT unnest(lazy))"
                  " FROM {s}.records WHERE oid = %s")
_GET_RECORD = "SELECT data FROM {s}.records WHERE oid = %s"
# The queued changes are sent as one statement per run of changes of one kind, with arrays
# of their parameters: one statement for a thousand records costs the server a fraction of
# a thousand statements. Refs travel as array literals ('{1,2}'), one text per record.
_PUT_RECORDS = """
INSERT INTO {s}.records (oid, data, refs, lazy, blobs)
SELECT oid, data, refs::bigint[], lazy::bigint[], blobs::text[]
FROM unnest(%b::bigint[], %b::bytea[], %b::text[], %b::text[], %b::text[])
     AS r (oid, data, refs, lazy, blobs)
ON CONFLICT (oid) DO UPDATE
SET data = EXCLUDED.data, refs = EXCLUDED.refs, lazy = EXCLUDED.lazy, blobs = EXCLUDED.blobs
"""
_DELETE_RECORDS = "DELETE FROM {s}.records WHERE oid = ANY(%s::bigint[])"
_EXISTING = "SELECT oid FROM {s}.records WHERE oid = ANY(%s::bigint[])"
_IS_REFERENCED = ("SELECT EXISTS (SELECT 1 FROM {s}.keys WHERE oid = %(oid)s)"
                  " OR EXISTS (SELECT 1 FROM {s}.records"
                  " WHERE refs @> ARRAY[%(oid)s::bigint] AND refs <> '{{}}')")
# For each object id: whether a key is bound to it, and up to REFERRERS + 1 records referring
# to it (more than REFERRERS: "many").
_REFERRERS = """
SELECT c.oid, EXISTS (SELECT 1 FROM {s}.keys k WHERE k.oid = c.oid),
       ARRAY(SELECT r.oid FROM {s}.records r
             WHERE r.refs @> ARRAY[c.oid] AND r.refs <> '{{}}' LIMIT {referrers} + 1)
FROM unnest(%s::bigint[]) AS c (oid)
"""
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
_KEYS_FROM = "SELECT key, oid FROM {s}.keys WHERE key >= %b ORDER BY key LIMIT %s"
_SET_KEYS = ("INSERT INTO {s}.keys (key, oid) SELECT * FROM unnest(%b::bytea[], %b::bigint[])"
             " ON CONFLICT (key) DO UPDATE SET oid = EXCLUDED.oid")
_READ_AHEAD_ROWS = ("SELECT k.key, k.oid, CASE WHEN octet_length(r.data) <= {read_ahead_max}"
                    " THEN r.data END, octet_length(r.data) FROM {s}.keys k"
                    " LEFT JOIN {s}.records r ON r.oid = k.oid")
_READ_AHEAD = _READ_AHEAD_ROWS + " WHERE k.key >= %b ORDER BY k.key LIMIT %s"
_READ_AHEAD_BEFORE = _READ_AHEAD_ROWS + " WHERE k.key >= %b AND k.key < %b ORDER BY k.key LIMIT %s"
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
_GET_META = "SELECT value FROM {s}.meta WHERE name = %s"
# What Store.info reports: counts and the bytes the values take (octet_length: as stored
# in the row, before TOAST compression).
_STATISTICS = """
SELECT (SELECT value FROM {s}.meta WHERE name = 'version')::int,
       (SELECT count(*) FROM {s}.records), (SELECT coalesce(sum(octet_length(data)), 0)
                                             FROM {s}.records),
       (SELECT count(*) FROM {s}.blobs WHERE name IS NOT NULL),
       (SELECT coalesce(sum(size), 0) FROM {s}.blobs WHERE name IS NOT NULL),
       current_setting('server_version')
"""
_SET_META = ("INSERT INTO {s}.meta VALUES (%s, %s) "
             "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value")


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


def _array(items: Collection[Any]) -> str:
    """A PostgreSQL array literal of ``items`` (numbers, or quoted names), each once."""
    return "{" + ",".join(map(str, dict.fromkeys(items))) + "}" if items else "{}"


def _batch(name: str, rows: list[Any]) -> tuple[list[Any], ...]:
    """The parameters of queued statement ``name`` for ``rows`` (each a change's): one
    array per column. A later change of one record or key replaces an earlier one (one
    statement may not change a row twice)."""
    if name == "delete_records":
        return (rows,)
    latest = list({row[0]: row for row in rows}.values())
    return tuple(list(column) for column in zip(*latest, strict=True))


class _Known:
    """What this connection knows of the store's keys and records as they are now, while no
    other connection can commit (under the write lock), so that a write transaction asks
    the server only once for each: the bindings of keys (``None``: known to be unbound),
    ranges of keys of which every binding is known, and records' data (``None``: no record).

    It holds the server's answers and this connection's own changes, those queued too.
    Forgetting is always safe, since every query sends the queued changes first.
    """

    def __init__(self) -> None:
        self.keys: dict[bytes, int | None] = {}
        # Disjoint, sorted (first, last) ranges of keys, last None for "and every key after":
        # a key of such a range missing from ``keys`` is unbound.
        self._firsts: list[bytes] = []
        self._lasts: list[bytes | None] = []
        self.records: dict[int, bytes | None] = {}
        self._record_bytes = 0

    def binding(self, key: bytes) -> tuple[bool, int | None]:
        """(whether the binding of ``key`` is known, the object id or None)."""
        if key in self.keys:
            return True, self.keys[key]
        i = bisect.bisect_right(self._firsts, key) - 1
        last = self._lasts[i] if i >= 0 else b""
        return i >= 0 and (last is None or key <= last), None

    def learn_range(self, first: bytes, rows: list[tuple[bytes, int]], complete: bool) -> None:
        """``rows``: every binding from key ``first`` on (to the end if ``complete``)."""
        if len(self.keys) + len(rows) > KNOWN_KEYS:
            self.forget_keys()
        self.keys.update(rows)
        last = None if complete else rows[-1][0]
        merged: list[tuple[bytes, bytes | None]] = []
        for start, end in sorted([*zip(self._firsts, self._lasts, strict=True), (first, last)],
                                 key=lambda item: item[0]):
            if merged:
                before_start, before_end = merged[-1]
                if before_end is None or start <= before_end:
                    merged[-1] = (before_start, None if before_end is None or end is None
                                  else max(before_end, end))
                    continue
            merged.append((start, end))
        self._firsts = [start for start, _ in merged]
        self._lasts = [end for _, end in merged]

    def learn_key(self, key: bytes, oid: int | None) -> None:
        if len(self.keys) >= KNOWN_KEYS:
            self.forget_keys()
        self.keys[key] = oid

    def learn_record(self, oid: int, data: bytes | None) -> None:
        self._record_bytes += len(data) if data is not None else 0
        if self._record_bytes > KNOWN_BYTES:
            self.records.clear()
            self._record_bytes = len(data) if data is not None else 0
        self.records[oid] = data

    def forget_keys(self) -> None:
        self.keys.clear()
        self._firsts.clear()
        self._lasts.clear()

    def forget(self) -> None:
        self.forget_keys()
        self.records.clear()
        self._record_bytes = 0


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

    name = "postgresql"

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
            oid_block=OID_BLOCK, referrers=REFERRERS, format_name=FORMAT_NAME,
            format_version=FORMAT_VERSION, read_ahead_max=READ_AHEAD_RECORD_MAX)
            for name, statement in _STATEMENTS.items()}
        self._conn: Any = None
        self._closed = False
        self._in_transaction = False
        # In a snapshot (begin_read): the rows read ahead, the marker it holds, and whether
        # its connection was lost (its reads fail until it ends: another would not be it).
        self._read_ahead: ReadAhead | None = None
        self._snapshot_marker = 0
        self._snapshot_lost = False
        self._next_oid = self._block_end = 0
        # Changes not sent yet, (statement name, parameters) in order: sent with the next
        # query, in one round trip before it (see _send).
        self._queued: list[tuple[str, Any]] = []
        self._queued_bytes = 0
        # A query sent ahead of need (see _send_ahead): its pipeline and cursor, or None.
        self._ahead: tuple[Any, Any] | None = None
        self._known = _Known()
        self._key_batch = FIRST_KEY_BATCH   # how many bindings bind_key's next query learns
        # The change marker _known is valid at; None: it is not.
        self._known_marker: int | None = None
        # The object ids a key of this transaction was bound to before (the store asks
        # is_referenced of each at commit), with what one query learnt of them all: whether
        # a key is bound to them, the records referring to them (None: more than REFERRERS),
        # valid while no key or record changes but by deletion (the ones deleted since).
        self._released: dict[int, tuple[bool, set[int] | None] | None] = {}
        self._released_learnt = False
        self._deleted: set[int] = set()
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
        if self._snapshot_lost:
            raise ConnectionLostError(self.path, "the connection was lost during this snapshot;"
                                      " its reads fail until it ends")
        if self._conn is None or self._conn.closed:
            self._connect()
        return self._conn

    def _send_ahead(self, name: str, params: Any) -> Any:
        """Send statement ``name`` with ``params`` now, and return the cursor that will hold
        its rows once :meth:`_rows_ahead` received them: the server runs it while this
        process works on what it has (psycopg's pipeline mode). Any other statement
        receives them first. Only outside write transactions: changes queued later would
        not be seen by it."""
        def send() -> Any:
            cursor = self._conn.cursor()
            self._ahead = self._enter_pipeline(
                lambda: cursor.execute(self._sql[name], params, binary=name in _BINARY_ROWS),
                cursor)
            return cursor
        return self._call(send)

    def _enter_pipeline(self, execute: Any, cursor: Any) -> tuple[Any, Any]:
        """Enter pipeline mode and ``execute()`` there (it sends statements, whose
        results go to ``cursor``); return what :attr:`_ahead` holds until they arrive."""
        pipeline = self._conn.pipeline()
        pipeline.__enter__()
        try:
            execute()
        except BaseException as error:
            pipeline.__exit__(type(error), error, error.__traceback__)
            raise
        return pipeline, cursor

    def _rows_ahead(self, cursor: Any) -> list[tuple[Any, ...]]:
        """The rows of the statement :meth:`_send_ahead` sent, whose cursor is ``cursor``."""
        return self._call(cursor.fetchall)

    def _receive_ahead(self) -> None:
        """End the pipeline of the statement sent ahead: its rows arrive in its cursor."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[0].__exit__(None, None, None)

    def _lost(self, error: BaseException) -> ConnectionLostError:
        """The error for a lost connection; the next call reconnects."""
        self._ahead = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._in_transaction = False
        self._forget()
        if self._read_ahead is not None:
            self._snapshot_lost = True
        return ConnectionLostError(self.path, self._reason(error))

    def _call(self, action: Any) -> Any:
        """``action()`` on the open connection; a lost connection becomes ConnectionLostError."""
        conn = self._connection()
        try:
            self._receive_ahead()
            return action()
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            if conn.broken or conn.closed:
                raise self._lost(error) from None
            raise

    def _execute(self, name: str, params: Any = None) -> Any:
        """Run statement ``name`` with ``params`` after the queued changes, in one round trip;
        return the cursor holding its rows."""
        return self._send((name, params))

    def _send(self, *last: tuple[str, Any]) -> Any:
        """Send the queued changes, then the statements ``last`` ((name, parameters) each), in
        one round trip (a pipeline); return the cursor holding the last statement's rows."""
        queued, self._queued = self._queued, []
        self._queued_bytes = 0

        def send() -> Any:
            if not queued and len(last) == 1:
                name, params = last[0]
                return self._cursor.execute(self._sql[name], params,
                                            binary=name in _BINARY_ROWS)
            with self._conn.pipeline():
                self._execute_changes(queued)
                for name, params in last:
                    self._cursor.execute(self._sql[name], params, binary=name in _BINARY_ROWS)
            return self._cursor
        return self._call(send)

    def _execute_changes(self, queued: list[tuple[str, Any]]) -> None:
        """Execute the changes ``queued``, one statement per run of changes of one kind
        (in a pipeline: sent, not waited for)."""
        for name, group in itertools.groupby(queued, key=lambda change: change[0]):
            self._cursor.execute(self._sql[name], _batch(name, [row for _, row in group]))

    def _queue(self, name: str, params: Any, size: int = 0) -> None:
        """Queue a change (statement ``name``, of ``size`` bytes); send the queue when full."""
        if not self._in_transaction:    # a write of no transaction: known only to the server
            self._forget()
        if name == "delete_records":
            self._deleted.add(params)
        else:   # what is_referenced learnt no longer holds
            self._released_learnt = False
        self._queued.append((name, params))
        self._queued_bytes += size
        if len(self._queued) >= QUEUE_RECORDS or self._queued_bytes >= QUEUE_BYTES:
            self._send_changes_ahead()

    def _send_changes_ahead(self) -> None:
        """Send the queued changes without waiting for the server to make them: it makes
        them while this process goes on (pickling the next ones); the next statement
        receives their outcome first (see :meth:`_send_ahead`), so a failed change fails
        that statement, and a commit never follows it."""
        queued, self._queued = self._queued, []
        self._queued_bytes = 0

        def send() -> None:
            self._ahead = self._enter_pipeline(lambda: self._execute_changes(queued),
                                               self._cursor)
        self._call(send)

    def _forget(self) -> None:
        """Drop the queued changes and what this connection knows of the store."""
        self._queued.clear()
        self._queued_bytes = 0
        self._known.forget()
        self._known_marker = None
        self._forget_released()

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

    def reserve_ids(self, up_to: int) -> None:
        check_reserved(up_to)
        # setval is not transactional: a rollback leaves the ids skipped.
        self._one("reserve_ids", {"sequence": f"{self._schema}.oids", "next": up_to + 1})
        if self._next_oid <= up_to:     # the block this connection holds: given up
            self._next_oid = self._block_end = 0

    def get_record(self, oid: int) -> bytes | None:
        if self._in_transaction and oid in self._known.records:
            return self._known.records[oid]
        data = self._one("get_record", (oid,))
        if self._in_transaction:
            self._known.learn_record(oid, data)
        return data

    def put_record(self, oid: int, data: bytes, refs: Collection[int],
                   *, lazy_refs: Collection[int] = (), blobs: Collection[str] = ()) -> None:
        # Queued, and sent many at a time (one pipelined round trip) with the next query, at
        # commit, or when the queue is full.
        self._queue("put_records", (oid, data, _array(refs), _array(lazy_refs),
                                    _array([f'"{name}"' for name in blobs])), len(data))
        if self._in_transaction:
            self._known.learn_record(oid, data)

    def delete_record(self, oid: int) -> None:
        self._queue("delete_records", oid)
        if self._in_transaction:
            self._known.learn_record(oid, None)

    def existing(self, oids: Collection[int]) -> set[int]:
        known = self._known.records if self._in_transaction else {}
        found = {oid for oid in oids if known.get(oid) is not None}
        unknown = [oid for oid in oids if oid not in known]
        if unknown:
            found.update(row[0] for row in self._execute("existing", (unknown,)))
        return found

    def is_referenced(self, oid: int) -> bool:
        if oid not in self._released:
            return self._one("is_referenced", {"oid": oid})
        if not self._released_learnt:
            for released, bound, referrers in self._execute("referrers", (list(self._released),)):
                self._released[released] = (bound, set(referrers) if len(referrers) <= REFERRERS
                                            else None)
            self._released_learnt = True
        bound, referrers = self._released[oid]  # type: ignore[misc]
        if bound:
            return True
        if referrers is None:   # many, of which some may be deleted since
            return not self._deleted or self._one("is_referenced", {"oid": oid})
        return bool(referrers - self._deleted)

    def refs_of(self, oid: int, *, lazy: bool = True) -> list[int]:
        """The object ids record ``oid`` refers to, without the lazy ones if not ``lazy``
        ([] without a record)."""
        return self._one("refs_of" if lazy else "eager_refs_of", (oid,)) or []

    def iter_records(self) -> Iterator[tuple[int, bytes, list[int]]]:
        """Every record, ``KEY_BATCH`` at a time by object id."""
        last = 0
        while rows := self._execute("records", (last, KEY_BATCH)).fetchall():
            yield from rows
            last = rows[-1][0]

    def reaches(self, sources: Collection[int], target: int) -> bool:
        return self._one("reaches", {"sources": list(sources), "target": target})

    # -- blobs ------------------------------------------------------------------------------

    def put_blob(self, chunks: Iterable[Any]) -> str:
        blob = self._one("new_blob")
        hasher = BlobHasher()
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
            name = hasher.name()
        except BaseException:
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

    def get_meta(self, name: str) -> str | None:
        check_meta_name(name)
        return self._one("get_meta", (name,))

    def statistics(self) -> Statistics:
        version, records, record_bytes, blobs, blob_bytes, server = \
            self._execute("statistics").fetchone()
        return Statistics(f"psycopg {psycopg.__version__} (PostgreSQL {server})", version,
                          records, int(record_bytes), blobs, int(blob_bytes))

    def set_meta(self, name: str, value: str) -> None:
        check_meta_name(name)
        self._execute("set_meta", (name, value))

    # Inside a write transaction keys and records are answered from what this connection
    # knows (_Known) where it can: no other connection commits meanwhile.

    def get_key(self, key: str) -> int | None:
        if self._read_ahead is not None:
            row = self._read_ahead.row(key)
            return None if row is None else row[1]
        name = key.encode()
        if self._in_transaction:
            known, oid = self._known.binding(name)
            if known:
                return oid
        oid = self._one("get_key", (name,))
        if self._in_transaction:
            self._known.learn_key(name, oid)
        return oid

    def get_item(self, key: str) -> tuple[int, bytes | None] | None:
        if self._read_ahead is not None:
            row = self._read_ahead.row(key)
            return None if row is None else self._read_ahead.item_of(row)
        name = key.encode()
        if not self._in_transaction:
            return self._execute("get_item", (name,)).fetchone()
        known, oid = self._known.binding(name)
        if known:
            return None if oid is None else (oid, self.get_record(oid))
        row = self._execute("get_item", (name,)).fetchone()
        self._known.learn_key(name, None if row is None else row[0])
        if row is not None:
            self._known.learn_record(row[0], row[1])
        return row

    def bind_key(self, key: str, oid: int) -> int | None:
        name = key.encode()
        if not self._in_transaction:
            self._forget()
            return self._one("bind_key", {"key": name, "oid": oid})
        # The previous binding is needed at once: known, or learnt with those of the
        # keys that follow (a bulk set binds many keys of one range); the new
        # binding is queued.
        known, old = self._known.binding(name)
        if not known:
            batch = min(self._key_batch, KEY_BATCH)
            self._key_batch = batch * 2
            rows = self._execute("keys_from", (name, batch)).fetchall()
            self._known.learn_range(name, rows, complete=len(rows) < batch)
            old = self._known.keys.get(name)
        if old != oid:
            self._queue("set_keys", (name, oid))
            self._known.learn_key(name, oid)
            if old is not None:
                self._released[old] = None
        return old

    def unbind_key(self, key: str) -> int | None:
        name = key.encode()
        old = self._one("unbind_key", (name,))
        self._released_learnt = False
        if self._in_transaction:
            self._known.learn_key(name, None)
            if old is not None:
                self._released[old] = None
        else:
            self._forget()
        return old

    def iter_keys(self) -> Iterator[str]:
        for rows in self._pages("first_keys", "next_keys"):
            yield from (row[0].decode() for row in rows)

    def iter_items(self) -> Iterator[tuple[str, int, bytes | None]]:
        for rows in self._pages("first_items", "next_items"):
            yield from ((key.decode(), oid, data) for key, oid, data in rows)

    def _pages(self, first: str, following: str) -> Iterator[list[tuple[Any, ...]]]:
        """The rows of statement ``first``, then of ``following`` after the key (first
        column) of each page's last row: KEY_BATCH rows a page, in key order.

        Keyset pagination: each page is a statement of its own, so no transaction stays
        open between pages and writes between them are allowed. Outside a write
        transaction the next page is asked for before this one is yielded
        (:meth:`_send_ahead`): the server finds it while the caller works on this one
        (a round trip and ~1 us a row less). In one, it is asked for after, so that it
        follows the changes made meanwhile.
        """
        rows = self._execute(first, (KEY_BATCH,)).fetchall()
        while rows:
            last = rows[-1][0]
            full = len(rows) == KEY_BATCH
            ahead = (self._send_ahead(following, (last, KEY_BATCH))
                     if full and not self._in_transaction else None)
            yield rows
            if not full:
                return
            rows = (self._rows_ahead(ahead) if ahead is not None else
                    self._execute(following, (last, KEY_BATCH)).fetchall())

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
        self._forget_released()
        self._key_batch = FIRST_KEY_BATCH
        marker = self._commits_at_begin - self._own_commits
        if marker != self._known_marker:    # another connection committed: forget all
            self._known.forget()
            self._known_marker = marker

    def _lock(self, script: str) -> Any:
        """Run ``script``, which begins a transaction and takes the write lock; return its
        cursor."""
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
        try:
            # The queued changes, the counter and COMMIT: one round trip.
            self._send(("count_commit", None), ("commit", None))
        except BaseException:
            self.rollback()     # a failed statement leaves the transaction open, aborted
            raise
        self._in_transaction = False
        self._own_commits += 1
        self._forget_released()

    def _forget_released(self) -> None:
        self._released.clear()
        self._released_learnt = False
        self._deleted.clear()

    def rollback(self) -> None:
        self._forget()      # what it knows includes the transaction's own changes
        if not self._in_transaction:
            return
        self._in_transaction = False
        if self._conn is not None and not self._conn.closed:
            try:
                self._receive_ahead()
            except psycopg.Error:
                pass    # changes sent ahead that failed: rolled back with the rest
            self._script("rollback")

    def change_marker(self) -> int:
        if self._in_transaction:    # the write lock is held: no one else commits
            return self._commits_at_begin - self._own_commits
        if self._read_ahead is not None:
            return self._snapshot_marker
        return self._one("commits") - self._own_commits

    def begin_read(self) -> None:
        cursor = self._script("begin_read")
        while cursor.nextset():     # past BEGIN's result, to the counter's
            pass
        self._snapshot_marker = cursor.fetchone()[0] - self._own_commits
        self._read_ahead = ReadAhead(self._fetch_ahead, self.get_record)

    def _fetch_ahead(self, key: str, limit: int, before: str | None) -> list[tuple[Any, ...]]:
        rows = (self._execute("read_ahead", (key.encode(), limit)) if before is None else
                self._execute("read_ahead_before", (key.encode(), before.encode(), limit))
                ).fetchall()
        return [(name.decode(), oid, data, length) for name, oid, data, length in rows]

    def end_read(self) -> None:
        if self._read_ahead is None:
            return
        self._read_ahead = None
        lost, self._snapshot_lost = self._snapshot_lost, False
        if not lost and self._conn is not None and not self._conn.closed:
            self._script("commit")

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
        self._known.forget()
        return deleted

    def after_fork(self) -> None:
        # The parent's socket is the parent's: dropped unclosed (closing it would end the
        # parent's session), and the child connects anew. The parent's oid block is too.
        if self._conn is not None:
            _INHERITED.append(self._conn)
        self._conn = None
        self._in_transaction = False
        self._read_ahead = None
        self._ahead = None
        self._snapshot_lost = False
        self._forget()
        self._next_oid = self._block_end = 0
        if not self._closed:
            self._connect()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._read_ahead = None     # a snapshot ends with its connection
        self._ahead = None          # and so does a statement sent ahead
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
    "count_commit": _COUNT_COMMIT, "commit": "COMMIT", "rollback": "ROLLBACK",
    "commits": _COMMITS, "lock_holder": _LOCK_HOLDER, "next_oids": _NEXT_OIDS,
    "reserve_ids": _RESERVE_IDS, "records": _RECORDS, "eager_refs_of": _EAGER_REFS_OF,
    "get_record": _GET_RECORD, "put_records": _PUT_RECORDS, "delete_records": _DELETE_RECORDS,
    "existing": _EXISTING, "is_referenced": _IS_REFERENCED, "referrers": _REFERRERS,
    "refs_of": _REFS_OF,
    "reaches": _REACHES, "gc_records": _GC_RECORDS, "gc_blobs": _GC_BLOBS,
    "new_blob": _NEW_BLOB, "put_chunk": _PUT_CHUNK, "find_blob": _FIND_BLOB,
    "name_blob": _NAME_BLOB, "drop_blob": _DROP_BLOB, "load_blob": _LOAD_BLOB,
    "blob_size": _BLOB_SIZE, "blob_chunk": _BLOB_CHUNK, "blob_names": _BLOB_NAMES,
    "get_key": _GET_KEY, "keys_from": _KEYS_FROM, "set_keys": _SET_KEYS,
    "get_item": _GET_ITEM, "bind_key": _BIND_KEY, "begin_read": _BEGIN_READ,
    "read_ahead": _READ_AHEAD, "read_ahead_before": _READ_AHEAD_BEFORE,
    "unbind_key": _UNBIND_KEY, "first_keys": _FIRST_KEYS, "next_keys": _NEXT_KEYS,
    "first_items": _FIRST_ITEMS, "next_items": _NEXT_ITEMS, "count_keys": _COUNT_KEYS,
    "get_meta": _GET_META, "set_meta": _SET_META, "statistics": _STATISTICS,
}

#: The statements whose rows come in PostgreSQL's binary format: those that read records
#: and keys (bytea, bigint, text), the hot reads. Binary bytea is the bytes themselves;
#: in the text format each byte comes as two hex digits, decoded on arrival.
_BINARY_ROWS = frozenset({"get_record", "get_item", "read_ahead", "read_ahead_before",
                          "first_items", "next_items", "records", "get_key", "keys_from",
                          "first_keys", "next_keys"})

# Connections inherited from a parent process, kept referenced forever: closing one in the
# child would send the server a terminate message for the parent's session.
_INHERITED: list[Any] = []
