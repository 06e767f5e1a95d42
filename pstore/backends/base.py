"""The interface between :mod:`pstore.store` and the storage underneath it.

A backend stores three things, as bytes, integers and names only; it knows
nothing of pickling:

* **records**: ``object id -> (data, refs, blobs)``, where ``data`` is the
  record's bytes, ``refs`` the object ids those bytes refer to -- some of them
  marked *lazy*: references that loading the record does not follow at once --
  and ``blobs`` the names of the blobs they use (refs and blobs kept so that the
  backend can find unreachable records and blobs on its own);
* **blobs**: large byte strings (arrays' buffers), written once and named by
  their content, so equal bytes are kept once; read back mapped into memory
  where the backend can;
* **keys**: ``str -> object id`` bindings.

The contract has two layers. :class:`ReadableBackend` is what every backend
implements: reading records, blobs and keys, change detection, fork and close
-- enough for a read-only view such as the ``shelve`` reader. :class:`Backend`
adds writing. Every method that changes something must be called inside a
write transaction (:meth:`Backend.begin` ... :meth:`Backend.commit` or
:meth:`Backend.rollback`, or the concrete :meth:`Backend.writing` context).
Methods that are not abstract have defaults (some raise ``NotImplementedError``
until a backend that can provides them).
Reads may be called inside or outside one. Outside, each read sees the latest
committed state; inside, every read (records, keys, iteration, counts, refs)
sees the transaction's own changes too -- the store relies on it, e.g. to read
back a key it has just bound, or to delete keys while iterating. Between
:meth:`ReadableBackend.begin_read` and :meth:`ReadableBackend.end_read` (a
*snapshot*, outside write transactions) every read sees one committed state, and
:class:`ReadAhead` may answer gets from rows fetched ahead.

A backend is used by one :class:`~pstore.store.Store` from one thread at a time
(the store serializes its threads); it may assume nothing of the caller beyond
that. It may assume no local file beyond its own code: a server database can
implement the same methods.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar, NamedTuple

from .._blake2 import digest_of, key_seal
from ..errors import Error, FormatError

__all__ = ["ReadableBackend", "Backend", "MAX_OID", "SEAL_SIZE", "ReadAhead", "RecordWrite",
           "Statistics", "binding_seal", "check_meta_name", "check_reserved"]

#: The largest object id any backend stores (a signed 64-bit integer's range).
MAX_OID = 2 ** 63 - 1

#: Bytes of a key binding's seal.
SEAL_SIZE = 8


def _python_binding_seal(key: str, oid: int) -> bytes:
    return digest_of((oid.to_bytes(8, "little"), key.encode("utf-8", "surrogatepass")),
                     SEAL_SIZE, b"", b"", b"pstore-key")


#: ``binding_seal(key, oid) -> bytes``: the check a backend stores with the binding of
#: ``key`` to ``oid`` (format version 3). BLAKE2b, 8 bytes, person ``pstore-key``, of the
#: object id as 8 little-endian bytes followed by the key in UTF-8 (lone surrogates
#: allowed); one C call where ``pstore._blake2_speedups`` is built. A binding whose seal
#: does not match was damaged: its reader raises :class:`~pstore.errors.CorruptionError`
#: instead of returning another record.
binding_seal: Callable[[str, int], bytes] = \
    key_seal if key_seal is not None else _python_binding_seal


class RecordWrite(NamedTuple):
    """One record for :meth:`Backend.put_records`: :meth:`Backend.put_record`'s arguments."""

    oid: int
    data: bytes
    refs: Collection[int]
    lazy_refs: Collection[int]
    blobs: Collection[str]


def check_reserved(up_to: int) -> None:
    """Raise ``ValueError`` unless ``up_to`` may be passed to :meth:`Backend.reserve_ids`."""
    if not 0 <= up_to < MAX_OID:
        raise ValueError(f"cannot reserve object ids up to {up_to}: ids are 1 to {MAX_OID - 1}")


class Statistics(NamedTuple):
    """What a backend holds, for :meth:`Store.info <pstore.store.Store.info>`."""

    #: The library underneath, with its version: ``"sqlite3 (SQLite 3.40.1)"``.
    module: str
    #: The store's on-disk format version (``docs/format.md``).
    format_version: int
    records: int
    #: Bytes of every record's data, as stored.
    record_bytes: int
    blobs: int
    #: Bytes of every blob, as stored (compressed ones compressed).
    blob_bytes: int


def check_meta_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a meta entry's name: lower-case letters and ``_``."""
    if not name or not all("a" <= c <= "z" or c == "_" for c in name):
        raise ValueError(f"a meta entry's name is lower-case letters and '_', not {name!r}")


class ReadableBackend(ABC):
    """One open connection to one store, for reading.

    Subclasses are constructed as ``Backend(path, flag, *, lock_timeout, fsync)``,
    plus ``variant=`` when :attr:`takes_variant` is true: ``flag`` is one of
    ``'r'``, ``'w'``, ``'c'``, ``'n'`` with the meaning :func:`pstore.open`
    documents; ``lock_timeout`` is how long (seconds) :meth:`Backend.begin` waits
    for another process's write transaction before raising
    :class:`~pstore.errors.LockTimeoutError`; ``fsync`` asks for commits that
    survive power loss, not only the death of the process. Opening something
    that is not a store of a format this code reads raises
    :class:`~pstore.errors.FormatError`. A class that implements only this
    interface is a read-only view: its ``read_only`` is True.
    """

    #: The backend's name in :data:`pstore.backends.BACKENDS` (or ``READERS``).
    name: str
    #: The location the store was opened with, for error messages.
    path: str
    #: True when opened with flag 'r' (always, for a read-only view): nothing is written.
    read_only: bool
    #: Every record whose object id is at least this carries a digest (format version 3);
    #: smaller ids may name records written before the store was upgraded to it.
    digests_from: int = 1
    #: Whether the class takes ``variant=`` (``pstore.open(..., backend="name:variant")``).
    takes_variant: ClassVar[bool] = False

    # -- records ------------------------------------------------------------------------

    @abstractmethod
    def get_record(self, oid: int) -> bytes | None:
        """The data of record ``oid``, or None if there is no such record."""

    @abstractmethod
    def existing(self, oids: Collection[int]) -> set[int]:
        """The subset of ``oids`` that have a record."""

    # -- blobs --------------------------------------------------------------------------

    @abstractmethod
    def get_blob(self, name: str, size: int, *, writable: bool) -> Any:
        """The ``size`` bytes of blob ``name``, as a buffer: mapped into memory if possible.

        ``writable``: the buffer may be written, and writes never reach the store
        (copy-on-write); else it is read-only. A backend that cannot map reads the
        bytes once into the buffer it returns. Raises
        :class:`~pstore.errors.FormatError` naming the blob if it is missing or
        not ``size`` bytes long.
        """

    def has_blob(self, name: str, size: int) -> bool:
        """Whether blob ``name`` of ``size`` bytes is stored, told cheaply (no hashing).

        The store asks before it writes a buffer it mapped from this very blob as a
        reference to it (a re-store), inside the write transaction, so no gc can
        remove it meanwhile. False (the default) makes the store write the blob again.
        """
        return False

    @abstractmethod
    def read_blob(self, name: str) -> Iterator[bytes]:
        """The bytes of blob ``name``, streamed in chunks (for blobs stored compressed)."""

    # -- keys ---------------------------------------------------------------------------

    @abstractmethod
    def get_key(self, key: str) -> int | None:
        """The object id ``key`` is bound to, or None."""

    @abstractmethod
    def get_item(self, key: str) -> tuple[int, bytes | None] | None:
        """``(object id, record data or None)`` for ``key`` in one step, or None if unbound."""

    @abstractmethod
    def iter_keys(self) -> Iterator[str]:
        """Every bound key, each once, streamed: memory does not grow with the number of keys.

        Outside a transaction, keys bound or unbound while the iteration runs may or
        may not be seen.
        """

    @abstractmethod
    def iter_items(self) -> Iterator[tuple[str, int, bytes | None]]:
        """``(key, object id, record data or None)`` of every bound key, streamed as iter_keys."""

    @abstractmethod
    def count_keys(self) -> int:
        """The number of bound keys."""

    # -- change detection and snapshots ---------------------------------------------------

    @abstractmethod
    def change_marker(self) -> Hashable:
        """A value that differs from the previous call's when another connection committed since.

        This connection's own commits need not change it.
        """

    @abstractmethod
    def begin_read(self) -> None:
        """Begin a snapshot (outside write transactions): from now until :meth:`end_read`,
        every read -- records, keys, blobs, iteration, counts, :meth:`change_marker` --
        sees the state the latest commit had left when this was called, and no other.
        Other connections' commits meanwhile are seen after :meth:`end_read`.
        """

    @abstractmethod
    def end_read(self) -> None:
        """End the snapshot :meth:`begin_read` began (nothing if none is open; harmless
        on a closed backend)."""

    # -- inspection and damage ----------------------------------------------------------

    def statistics(self) -> Statistics:
        """Counts and sizes of what the store holds. Reads only; outside transactions."""
        raise NotImplementedError(f"{type(self).__name__} keeps no statistics")

    def iter_records(self) -> Iterator[tuple[int, bytes, list[int]]]:
        """``(object id, data, refs)`` of every record, streamed (for verification); by
        default over :meth:`record_ids`, :meth:`get_record` and :meth:`refs_of`."""
        for oid in self.record_ids():
            data = self.get_record(oid)
            if data is not None:
                yield oid, data, list(self.refs_of(oid))

    def is_damage(self, error: Exception) -> bool:
        """Whether ``error``, raised while reading stored bytes, means they are damaged
        (not that the store is busy, closed or locked). By default every error that is
        not one of pstore's own, and :class:`~pstore.errors.FormatError`, is."""
        return not isinstance(error, Error) or isinstance(error, FormatError)

    def problems(self) -> list[str]:
        """Damage this backend found and set aside rather than use (e.g. a journal that
        failed its check), each a sentence naming the file; for ``Store.verify()``."""
        return []

    # -- meta entries -------------------------------------------------------------------

    def get_meta(self, name: str) -> str | None:
        """The store's meta entry ``name`` (lower-case letters and ``_``), as the last
        :meth:`Backend.set_meta` left it, or None. Entries are facts about the store the
        store layer keeps (the signing key's fingerprint, ``key_fingerprint``); a
        backend keeps them beside its own (SQLite and PostgreSQL: rows of the meta
        table; DBM: the key ``m:NAME``). A view that keeps none returns None."""
        return None

    # -- graph primitives (of the defaults iter_records, Backend.reaches, Backend.gc) --
    # Not abstract: a backend that overrides those (SQLite, with recursive queries) needs
    # only refs_of; one that has no graph of its own (a read-only view) none of them.

    def refs_of(self, oid: int, *, lazy: bool = True) -> Collection[int]:
        """The object ids record ``oid`` refers to (without its lazy refs if not ``lazy``);
        empty if there is no such record."""
        raise NotImplementedError(f"{type(self).__name__}.refs_of")

    def blobs_of(self, oid: int) -> Collection[str]:
        """The names of the blobs record ``oid`` uses."""
        raise NotImplementedError(f"{type(self).__name__}.blobs_of")

    def record_ids(self) -> Iterator[int]:
        """The object id of every record, each once (inside a write transaction: with its
        changes). The caller may delete records while iterating."""
        raise NotImplementedError(f"{type(self).__name__}.record_ids")

    def bound_ids(self) -> Iterator[int]:
        """The object id of every key binding (an id once per key bound to it)."""
        raise NotImplementedError(f"{type(self).__name__}.bound_ids")

    # -- lifetime -----------------------------------------------------------------------

    @abstractmethod
    def after_fork(self) -> None:
        """In a child process after ``fork()``: replace every OS resource shared with the parent.

        The parent's connections and locks must be left as they are (closing or
        unlocking them from the child would act on the parent's).
        """

    @abstractmethod
    def close(self) -> None:
        """Release every resource; a transaction still open is rolled back. Idempotent."""


#: The most rows one read-ahead query fetches (see :class:`ReadAhead`).
READ_AHEAD_ROWS = 512
#: Records longer than this are not fetched ahead: their key's row says only their length.
READ_AHEAD_RECORD_MAX = 1 << 16
#: Rows fetched ahead are forgotten (all at once) beyond this many, or these many bytes.
READ_AHEAD_KEPT_ROWS = 1 << 16
READ_AHEAD_KEPT_BYTES = 64 << 20


class ReadAhead:
    """Key bindings and their records fetched ahead in key order during a snapshot, where
    they cannot change: what makes many gets in one snapshot cost a few queries.

    ``fetch(key, limit, before)`` returns, in key order, up to ``limit`` rows ``(key,
    object id, data, length, *rest)`` of the keys from ``key`` on, and below ``before``
    unless it is None: ``data`` is None for a record longer than
    :data:`READ_AHEAD_RECORD_MAX` (``length`` is its length) or for none (``length``
    None). A get of a key not fetched yet fetches it with the keys after it, up to the
    first key of a range fetched before (so no row is fetched twice), the number of rows
    doubling from 1 at each fetch up to :data:`READ_AHEAD_ROWS`: a snapshot that reads
    one key pays one small query, one that reads thousands a query per hundreds (in
    random order too: most keys then lie in a range fetched before). A key inside a
    fetched range without a row is unbound, with no query. ``get_record(oid)`` reads a
    record not fetched ahead. Made at the snapshot's start, dropped at its end.
    """

    def __init__(self, fetch: Callable[[str, int, str | None], list[tuple[Any, ...]]],
                 get_record: Callable[[int], bytes | None]) -> None:
        self._fetch = fetch
        self._get_record = get_record
        self._rows: dict[str, tuple[Any, ...]] = {}     # key -> its row
        # The ranges fetched, [start, stop) of keys (stop None: to the end), sorted and
        # disjoint: their starts, and each one's stop.
        self._starts: list[str] = []
        self._stops: list[str | None] = []
        self._limit = 1
        self._bytes = 0

    def row(self, key: str) -> tuple[Any, ...] | None:
        """The row ``(key, object id, data, length, *rest)`` of ``key``, or None if it is
        unbound."""
        found = self._rows.get(key)
        if found is not None:
            return found
        starts, stops = self._starts, self._stops
        at = bisect.bisect_right(starts, key)   # ranges [0, at) start at or before key
        if at:
            stop = stops[at - 1]
            if stop is None or key < stop:
                return None     # fetched: unbound
        before = starts[at] if at < len(starts) else None
        fetched = self._fetch(key, self._limit, before)
        limit, self._limit = self._limit, min(self._limit * 2, READ_AHEAD_ROWS)
        if len(self._rows) + len(fetched) > READ_AHEAD_KEPT_ROWS or \
                self._bytes > READ_AHEAD_KEPT_BYTES:
            self._forget()
            at = 0
        # All keys in [key, stop) are fetched: up to the last row's, or to ``before``
        # when fewer rows than asked came (the smallest key after a str is it + "\0").
        starts.insert(at, key)
        stops.insert(at, fetched[-1][0] + "\0" if len(fetched) == limit else before)
        self._rows.update({fetched_row[0]: fetched_row for fetched_row in fetched})
        self._bytes += sum([len(row[2]) for row in fetched if row[2] is not None])
        return self._rows.get(key)

    def _forget(self) -> None:
        self._rows.clear()
        self._starts.clear()
        self._stops.clear()
        self._bytes = 0

    def item_of(self, row: tuple[Any, ...]) -> tuple[int, bytes | None]:
        """``(object id, record data or None)`` of a row :meth:`row` gave."""
        oid, data, length = row[1:4]
        return oid, (self._get_record(oid) if data is None and length is not None else data)


class Backend(ReadableBackend):
    """One open connection to one store, for reading and writing (constructed as
    :class:`ReadableBackend` says). Opened with flag 'r', ``read_only`` is True and
    nothing is written: :meth:`begin` raises :class:`~pstore.errors.ReadOnlyError`.
    """

    @contextmanager
    def writing(self) -> Iterator[Backend]:
        """Run the block in a write transaction: :meth:`begin`, then :meth:`commit` if the
        block ends normally, else :meth:`rollback` (also when the commit fails)."""
        self.begin()
        try:
            yield self
            self.commit()
        except BaseException:
            self.rollback()
            raise

    # -- records ------------------------------------------------------------------------

    @abstractmethod
    def new_oid(self) -> int:
        """Allocate an object id (> 0) that no record has, had, or will be given by another call.

        Inside a write transaction only; ids allocated in a transaction that is rolled
        back may be allocated again.
        """

    @abstractmethod
    def reserve_ids(self, up_to: int) -> None:
        """Make every later :meth:`new_oid` return an id above ``up_to``: records copied in
        under their own ids (:func:`pstore.copy`) are never overwritten by new ones.

        Inside a write transaction; takes effect with it (a rollback may leave ids
        skipped, never handed out twice). Holds for this connection and every one that
        opens later; a connection open already may keep handing out the ids of a block
        it reserved before (the backends that allocate ids in blocks). Ids already above
        ``up_to`` stay as they are. Raises ``ValueError`` if ``up_to`` is below 0 or
        not below the largest id.
        """

    @abstractmethod
    def put_record(self, oid: int, data: bytes, refs: Collection[int],
                   *, lazy_refs: Collection[int] = (), blobs: Collection[str] = ()) -> None:
        """Create record ``oid``, or replace its data, refs and blobs if it exists.

        ``lazy_refs``, a subset of ``refs``, are the references that loading the
        record does not follow at once (references to Persistent objects); only
        :meth:`reaches` tells them apart. ``blobs``: the names (from
        :meth:`put_blob`) of the blobs ``data`` uses.
        """

    def put_records(self, records: Iterable[RecordWrite]) -> None:
        """:meth:`put_record` of each one, in order. A backend may override it to send
        many records in one statement (SQLite: ``executemany``); the store calls it with
        every record of a commit it has pickled so far."""
        for oid, data, refs, lazy_refs, blobs in records:
            self.put_record(oid, data, refs, lazy_refs=lazy_refs, blobs=blobs)

    @abstractmethod
    def set_meta(self, name: str, value: str) -> None:
        """Set meta entry ``name`` (see :meth:`ReadableBackend.get_meta`) to ``value``.
        Inside a write transaction only."""

    @abstractmethod
    def delete_record(self, oid: int) -> None:
        """Remove record ``oid``, its refs and its blobs' names; no error if it does not exist."""

    @abstractmethod
    def is_referenced(self, oid: int) -> bool:
        """Whether a key is bound to ``oid`` or a record's refs contain it."""

    def reaches(self, sources: Collection[int], target: int) -> bool:
        """Whether ``target`` is one of ``sources`` or reachable from them through refs
        that are not lazy.

        The default walks :meth:`refs_of`; memory grows with the records reached.
        """
        seen: set[int] = set()
        stack = list(sources)
        while stack:
            oid = stack.pop()
            if oid == target:
                return True
            if oid not in seen:
                seen.add(oid)
                stack.extend(self.refs_of(oid, lazy=False))
        return False

    # -- blobs --------------------------------------------------------------------------

    @abstractmethod
    def put_blob(self, chunks: Iterable[Any]) -> str:
        """Store the concatenated bytes of the buffers ``chunks`` as a blob; return its name.

        Inside a write transaction. The name is a function of the bytes alone, and
        storing bytes already stored adds nothing. The blob is durable before
        :meth:`commit` makes the records that name it durable, so a committed record
        never names a missing or partial blob (a backend may finish writing it in
        the background until then, as the local backends do); if the transaction
        rolls back, no reader ever sees the blob.
        """

    # -- keys ---------------------------------------------------------------------------

    @abstractmethod
    def bind_key(self, key: str, oid: int) -> int | None:
        """Bind ``key`` to ``oid``; return the object id it was bound to before, or None."""

    def bind_keys(self, bindings: Sequence[tuple[str, int]]) -> set[int]:
        """Bind each ``(key, oid)`` of ``bindings`` (distinct keys) as :meth:`bind_key` does;
        return the object ids those keys were bound to before and no longer are.

        The store calls it with every key a transaction bound, before the transaction
        reads keys and at its commit. The default calls :meth:`bind_key` for each; a
        backend may override it to bind many keys in few statements (SQLite)."""
        released: set[int] = set()
        for key, oid in bindings:
            previous = self.bind_key(key, oid)
            if previous is not None and previous != oid:
                released.add(previous)
        return released

    @abstractmethod
    def unbind_key(self, key: str) -> int | None:
        """Remove ``key``; return the object id it was bound to, or None if it was unbound."""

    # -- transactions -------------------------------------------------------------------

    @abstractmethod
    def begin(self) -> None:
        """Start a write transaction, first taking the cross-process write lock.

        Sees the latest committed state. Raises
        :class:`~pstore.errors.LockTimeoutError` after ``lock_timeout`` seconds, and
        :class:`~pstore.errors.ReadOnlyError` on a read-only backend.
        """

    @abstractmethod
    def commit(self) -> None:
        """Make the transaction's changes durable and visible to others; release the lock."""

    @abstractmethod
    def rollback(self) -> None:
        """Discard the transaction's changes and release the lock."""

    # -- coordination -------------------------------------------------------------------

    def key_lock(self, key: str, timeout: float) -> AbstractContextManager[None]:
        """A context holding a cross-process lock of its own for ``key``, waiting up to
        ``timeout`` seconds (``inf``: as long as it takes) before
        :class:`~pstore.errors.LockTimeoutError`.

        Not the write lock: holding it blocks nobody's reads or writes, only other
        holders of the same key's lock (compute-once, :mod:`pstore.store.compute`).
        Outside transactions. The file backends keep one lock file per key; a
        server database would use its own advisory locks.
        """
        raise NotImplementedError(f"{type(self).__name__} has no key locks")

    # -- maintenance --------------------------------------------------------------------

    def gc(self) -> int:
        """Delete every record no key reaches through refs; return how many were deleted.

        Also deletes, when the transaction commits, every blob no remaining record
        names. Inside a write transaction. Readers in other processes are not blocked.

        The default marks from :meth:`bound_ids` through :meth:`refs_of` and sweeps
        :meth:`record_ids` (the records that exist, not a range of ids); memory grows
        with the number of records (their ids), never with their data.
        """
        live: set[int] = set()
        stack = list(self.bound_ids())
        while stack:
            oid = stack.pop()
            if oid not in live:
                live.add(oid)
                stack.extend(self.refs_of(oid))
        deleted = 0
        for oid in self.record_ids():
            if oid not in live:
                self.delete_record(oid)
                deleted += 1
        self.collect_blobs({name for oid in live for name in self.blobs_of(oid)})
        return deleted

    def collect_blobs(self, referenced: Collection[str]) -> None:
        """Delete, when the transaction commits, every blob not in ``referenced``."""
        raise NotImplementedError(f"{type(self).__name__}.collect_blobs")

    def vacuum(self) -> int:
        """Give the space of deleted records and blobs back to the file system (or
        server), under the write lock, while readers keep working; return how many
        bytes the store's files shrank by. Outside transactions."""
        raise NotImplementedError(f"{type(self).__name__} cannot vacuum")
