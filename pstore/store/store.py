"""The Store: a persistent ``MutableMapping[str, object]`` with shared objects kept shared.

Every stored object is a record with an integer object id; keys bind names to
object ids. A record's pickle refers to any other object already in the store
(loaded from it, or saved to it, by this Store) by that object's id, and
loading goes through an :class:`~pstore.store.identity.IdentityMap`, so within
one open Store an object id is one Python object. Objects of
:class:`~pstore.store.persistent.Persistent` classes are referred to lazily: a
reference loads as a placeholder that reads its record when first used. See
``docs/store.md`` and ``docs/persistent.md``.

This module is the mapping, the lifecycle and the reading side. :func:`open` (in
:mod:`pstore.store.opening`) checks the options and makes a Store; the record codec
is :mod:`pstore.store.codec`, the writing side :mod:`pstore.store.transaction`, what
is known to be current :mod:`pstore.store.freshness`.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    MutableMapping,
    ValuesView,
)
from contextlib import AbstractContextManager, contextmanager
from itertools import islice
from typing import TYPE_CHECKING, Any, cast

from ..backends import Backend, ReadableBackend
from ..errors import (
    ArgumentError,
    ClosedError,
    InTransactionError,
    KeyTypeError,
    MissingClassError,
    ReadOnlyError,
    StorePicklingError,
)
from . import blobio
from .codec import RecordLoader
from .freshness import Freshness
from .identity import IdentityMap
from .persistent import GHOST, Persistent, detach, status_of
from .renames import Renames
from .signing import FINGERPRINT_META, Signer, made_with, signer_for
from .transaction import Transaction
from .verify import VerifyReport, load_error, verify
from .views import LoadErrors, LoadingItems, LoadingValues

if TYPE_CHECKING:   # imported where used: compute-once and inspection are not on every path
    from . import inspection

__all__ = ["Store", "DEFAULT_BLOB_THRESHOLD", "DEFAULT_MAX_RECORD_SIZE"]

#: Out-of-band buffers of at least this many bytes are stored as blobs by default.
DEFAULT_BLOB_THRESHOLD = 64 * 1024
#: A record's payload larger than this (decompressed) is refused by default.
DEFAULT_MAX_RECORD_SIZE = 1 << 30
#: Iterating over items or values loads this many records under one hold of the Store's
#: lock, then yields them (one lock, check and flush per row cost ~1 us of ~7).
ITEMS_AHEAD = 64



class Store(MutableMapping[str, Any]):
    """A persistent mapping from str keys to picklable objects. Create one with :func:`open`.

    What a user may rely on:

    * ``s[k] = v`` outside :meth:`transaction` is committed when it returns.
    * An object already in the store (loaded from or saved to it by this Store) is
      written into other values as a reference, not a copy; after reopening, every
      reference to it loads as the same object. Assigning such an object to a key
      rewrites its record, which every reference sees.
    * ``s[k]`` returns the same object for the same record as long as you hold it,
      until another process commits (then the next read loads the record again) or
      a transaction that wrote it rolls back. A :class:`~pstore.Persistent` object
      stays the object of its record even then: it reloads its state in place.
    * A read outside a transaction sees the latest committed state.
    * Safe to share between threads: calls are serialized, and a transaction holds
      the Store for its thread until it ends.
    * After ``close()`` every method raises :class:`~pstore.errors.ClosedError`.
    * Every Store is the :class:`~pstore.store.persistent.DataManager` of its
      Persistent objects: :meth:`setstate` and :meth:`register` are theirs to call.
    """

    def __init__(self, backend: ReadableBackend, *, protocol: int, writeback: bool,
                 blob_threshold: int | None = DEFAULT_BLOB_THRESHOLD,
                 compression: str | None = None, readonly_buffers: bool = False,
                 max_record_size: int = DEFAULT_MAX_RECORD_SIZE, signer: Signer | None = None,
                 allow: str | Iterable[str] = (), renames: Renames | None = None) -> None:
        """A Store over ``backend``: :func:`~pstore.store.opening.open` makes one, its
        options checked first (these are its defaults; ``signer`` None: the user's key)."""
        self._backend = backend
        self._renames = renames
        self._signer = signer = signer_for(None) if signer is None else signer
        self._max_record_size = max_record_size
        self._path = backend.path
        self._read_only = backend.read_only or not isinstance(backend, Backend)
        self._lock = threading.RLock()
        self._ids = IdentityMap()
        # A read-only view never reaches the write side: every write checks _read_only first.
        self._txn = Transaction(self, cast(Backend, backend), self._ids, protocol=protocol,
                                writeback=writeback and not self._read_only,
                                blob_threshold=float("inf") if blob_threshold is None
                                else blob_threshold, codec=blobio.CODECS[compression],
                                signer=signer)
        self._loader = RecordLoader(self, backend, self._ids, self._txn.pending,
                                    writable_buffers=not readonly_buffers,
                                    max_record_size=max_record_size, mapped=self._txn.mapped,
                                    signer=signer, allow=allow, renames=renames)
        # In a store made with this Store's key any record that does not verify was
        # changed after it was written: an IntegrityError, whatever byte changed.
        self._loader.own_store = made_with(signer, backend, writable=not self._read_only)
        # A repeated get of a key whose object is still loaded costs one change-marker
        # query instead of reading the key.
        self._fresh = Freshness(backend, self._ids)    # held: a snapshot is open
        self._closed = False
        _open_stores[id(self)] = self

    # -- state ------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The path (or location) the store was opened with."""
        return self._path

    @property
    def read_only(self) -> bool:
        """True when opened with flag 'r' (or on a read-only view, such as a shelve file)."""
        return self._read_only

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "read-only" if self.read_only else "open"
        return f"<pstore.Store {self._path!r} {state}>"

    # -- the mapping ------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        with self._lock:
            self._check_open()
            self._check_key(key)
            depth = self._txn.depth
            if depth:
                self._txn.flush_binds()     # outside the try: a failure here is no read of key
            try:
                known = None if depth else self._fresh.loaded(key)
                if known is not None:
                    if self._txn.writeback:
                        self._txn.cache.keep(known[0], known[1], None)
                    return known[1]
                item = self._backend.get_item(key)
                if item is not None:
                    oid, data = item
                    if depth:     # the transaction saw the latest state when it began
                        obj = self._loader.load(oid, data)
                    else:
                        obj = self._load_latest(oid, data)
            except Exception as error:
                raise load_error(error, self._path, key=key, is_damage=self._backend.is_damage)
            if item is None:
                raise KeyError(key)
            if self._txn.writeback:
                self._txn.cache.keep(oid, obj, data)
            if not depth:
                self._fresh.remember(key, oid)
            self._ids.maybe_sweep()
            return obj

    def __setitem__(self, key: str, value: Any) -> None:
        with self._lock:
            self._check_writable("assign to a key")
            self._check_key(key)
            if self._txn.depth:     # joins the open transaction: no need for a scope of its own
                self._txn.assign(key, value)
                return
            with self._transaction():
                self._txn.assign(key, value)

    def __delitem__(self, key: str) -> None:
        with self._lock:
            self._check_writable("delete a key")
            self._check_key(key)
            with self._transaction():
                if not self._txn.unbind(key):
                    raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            # Here, in __len__ and in __iter__ the identity map is not used: no need to
            # look for other processes' commits first.
            self._check_open()
            if not isinstance(key, str) or not _storable_key(key):
                return False
            backend = self._keys()      # outside the try: a failure here is no read of key
            try:
                return backend.get_key(key) is not None
            except Exception as error:
                raise load_error(error, self._path, key=key, is_damage=self._backend.is_damage)

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            backend = self._keys()
            try:
                return backend.count_keys()
            except Exception as error:
                raise load_error(error, self._path, is_damage=self._backend.is_damage)

    def __iter__(self) -> Iterator[str]:
        """Stream the keys (in sorted order for the SQLite backend), a batch at a time.

        Outside a transaction, keys bound or unbound while iterating may or may not
        be seen; inside one, the iteration sees the transaction's state.
        """
        with self._lock:
            self._check_open()
            keys = self._keys().iter_keys()
        while True:
            with self._lock:
                self._check_open()
                self._txn.flush_binds()     # the next batch sees keys bound meanwhile
                try:
                    key = next(keys, None)     # keys are str: None is the end
                except Exception as error:
                    raise load_error(error, self._path, is_damage=self._backend.is_damage)
            if key is None:
                return
            yield key

    def items(self, *, errors: LoadErrors = "raise") -> ItemsView[str, Any]:
        """A view whose iteration streams ``(key, value)`` pairs, a batch of records per query.

        ``errors``: what a record whose class (or another global it names) cannot be
        imported does: ``"raise"`` (default) :class:`~pstore.errors.MissingClassError`,
        ``"skip"`` its key is left out, ``"collect"`` left out and its error kept in the
        view's ``skipped`` list (a new one each iteration). Any other error
        (damage, a failing ``__setstate__``) raises whatever ``errors`` says.
        """
        return LoadingItems(self, self._iter_items, errors)

    def values(self, *, errors: LoadErrors = "raise") -> ValuesView[Any]:
        """A view whose iteration streams the values, a batch of records per query;
        ``errors`` as for :meth:`items`."""
        return LoadingValues(self, self._iter_items, errors)

    def _iter_items(self, skipped: list[MissingClassError] | None = None
                    ) -> Iterator[tuple[str, Any]]:
        """``(key, value)`` pairs; with a ``skipped`` list, a record whose class is gone is
        left out and its error appended."""
        with self._lock:
            self._check_open()
            if not self._txn.depth:     # drop loaded objects if another process committed
                self._fresh.see_latest()
            rows = self._keys().iter_items()
        while True:
            with self._lock:
                self._check_open()
                self._txn.flush_binds()     # the next rows see keys bound meanwhile
                pairs, failure = self._load_rows(rows, ITEMS_AHEAD)
            yield from pairs
            if failure is not None:
                if skipped is None or not isinstance(failure, MissingClassError):
                    raise failure
                skipped.append(failure)
            elif len(pairs) < ITEMS_AHEAD:
                return

    def _load_rows(self, rows: Iterator[tuple[str, int, bytes | None]], limit: int
                   ) -> tuple[list[tuple[str, Any]], Exception | None]:
        """Load up to ``limit`` of ``rows``: the pairs loaded, and the error that stopped
        the loading (its row is consumed), if one did. The pairs before an error are
        still yielded before it is raised, as if each row were loaded as it is yielded."""
        pairs: list[tuple[str, Any]] = []
        load, ids, txn = self._loader.load, self._ids, self._txn
        key: Any = None     # the row's key, once it is read
        try:
            for key, oid, data in islice(rows, limit):
                value = load(oid, data)
                if txn.writeback:
                    txn.cache.keep(oid, value, data)
                pairs.append((key, value))
                key = None
        except Exception as error:
            return pairs, load_error(error, self._path, key=key,
                                     is_damage=self._backend.is_damage)
        finally:
            ids.maybe_sweep()
        return pairs, None

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Assign every pair, in one transaction (all or nothing)."""
        with self.transaction():
            super().update(other, **kwargs)

    def clear(self) -> None:
        """Delete every key, in one transaction."""
        with self.transaction():
            while True:
                batch = list(islice(self._keys().iter_keys(), 1000))
                if not batch:
                    return
                for key in batch:
                    del self[key]

    # -- transactions and lifetime ----------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Store]:
        """Run the block as one transaction: committed if it ends normally, else rolled back.

        The block sees the latest committed state at its start and holds the write
        lock (other processes' writes wait; their reads do not). Values assigned in
        it are pickled at commit, so they may refer to one another in any order; a
        value that cannot be pickled rolls the whole transaction back and raises
        ``PicklingError`` naming its key. A rollback also restores the Store's
        memory: objects first stored in the transaction are forgotten, and objects
        it rewrote load again from their committed state. A nested ``transaction()``
        joins the outer one: nothing is committed or rolled back until the
        outermost block ends. With ``writeback=True`` the outermost commit also
        writes every cached object back.
        """
        with self._lock:
            self._check_writable("start a transaction")
            with self._transaction(flush_cache=True):
                yield self

    @contextmanager
    def snapshot(self) -> Iterator[Store]:
        """Run the block's reads on one snapshot: every read in it -- gets, ``in``,
        ``len``, iteration, Persistent objects loading -- sees the state the latest
        commit left when the block began, and none of the commits other processes make
        meanwhile (seen after the block). The block reads only: a write in it raises
        :class:`~pstore.errors.InTransactionError` (changes of Persistent objects wait
        for the next commit after it).

        It is also how to read many keys fast: the store looks for other processes'
        commits once, at the start, instead of at reads, and the bindings and records
        of keys that follow a key read are fetched with it (a few hundred per query;
        records up to 64 KiB), so many gets cost a few queries -- or, on PostgreSQL, a
        few round trips. On SQLite and PostgreSQL a snapshot keeps no writer waiting
        (each reader has a snapshot of its own); on DBM, which has none, it holds the
        write lock, so other processes' writes wait for it (up to their lock
        timeout). A nested ``snapshot()`` joins the outer one; inside a transaction it
        is that transaction, which already sees one state.
        """
        with self._lock:
            self._check_open()
            if self._txn.depth or self._fresh.held:     # it already sees one state
                yield self
                return
            self._backend.begin_read()
            try:
                self._fresh.hold()
                yield self
            finally:
                self._end_snapshot()

    def _end_snapshot(self) -> None:
        self._fresh.held = False
        self._backend.end_read()

    @property
    def in_transaction(self) -> bool:
        """True while the calling thread has a :meth:`transaction` of this Store open."""
        with self._lock:    # another thread's transaction holds it until its end
            return self._txn.depth > 0

    def get_or_compute(self, key: str, compute: Callable[[], Any], *,
                       timeout: float | None = None,
                       valid: Callable[[Any], bool] | None = None) -> Any:
        """``self[key]``, or, if it is missing, ``compute()``'s result, stored under ``key``.

        Across processes exactly one computes a missing value while the others wait
        for it (a lock of the key's own, not the write lock: other keys stay
        writable), then load what it stored; if ``compute`` raises, nothing is stored
        and the next waiter tries. ``timeout``: seconds to wait for another process's
        computation (None, the default: as long as it takes). ``valid(value)``
        returning False makes a stored value count as missing: it is computed again
        and replaced. Not inside a :meth:`transaction` (its result would stay
        invisible to the others until the commit). See ``docs/datasets.md``.
        """
        from . import compute as compute_once

        # The backend's key lock, asked for only when needed: a read-only view has none.
        return compute_once.get_or_compute(
            self, key, compute, key_lock=lambda key, wait: self._txn.backend.key_lock(key, wait),
            timeout=timeout, valid=valid)

    def memoize(self, func: Callable[..., Any] | None = None, *, name: str | None = None,
                check_code: bool = True) -> Any:
        """Decorator: store each distinct call's result, computed once across processes.

        ``@s.memoize`` or ``@s.memoize(name=..., check_code=...)``. A call's key is
        the function's ``module.qualname`` (or ``name``) and a digest of its bound
        arguments (:func:`pstore.store.compute.arguments_digest` says when two calls
        share one); with ``check_code`` (default) a result computed by another
        version of the function's code counts as missing. The decorated function
        has ``.key(*args, **kwargs)`` and ``.forget(*args, **kwargs)``.
        """
        from . import compute as compute_once

        return compute_once.memoize(self, func, name=name, check_code=check_code)

    def sync(self) -> None:
        """Commit the changed Persistent objects and write back the cached objects
        (``writeback=True``), then see what other processes committed.

        Every other write is already committed when it returns. Inside a
        transaction it does nothing (the transaction's end commits).
        """
        with self._lock:
            self._check_open()
            if self._txn.depth or self._fresh.held:
                return
            self._write_back()
            self._fresh.see_latest()

    def _write_back(self) -> None:
        """Outside a transaction: commit the changed Persistent objects and the cache."""
        if self._txn.has_unsaved:
            with self._transaction(flush_cache=True):
                pass

    def gc(self) -> int:
        """Delete the records no key reaches; return how many. Other processes keep reading."""
        with self._lock:
            self._check_writable("collect garbage")
            with self._transaction():
                return self._txn.collect_garbage()

    def vacuum(self) -> int:
        """Give the space of deleted records back to the file system; return how many bytes
        the store's files shrank by. Run :meth:`gc` first to delete what no key reaches.
        Takes the write lock; other processes keep reading. Not inside a transaction."""
        with self._lock:
            self._check_writable("vacuum")
            if self._txn.depth:
                raise InTransactionError(self._path, "vacuum")
            return self._txn.backend.vacuum()

    def info(self) -> inspection.StoreInfo:
        """Counts and sizes of what the store holds (``pstore info``); reads only."""
        with self._lock:
            self._check_open()
            from . import inspection

            return inspection.store_info(self._keys(), self._backend.get_meta(FINGERPRINT_META))

    @property
    def key_fingerprint(self) -> str:
        """The fingerprint (16 hex digits) of the key this Store signs with: records
        carrying it load with full pickle semantics; safe to show."""
        return self._signer.fingerprint_hex

    def describe(self, pattern: str | None = None) -> Iterator[tuple[str, inspection.RecordInfo]]:
        """``(key, RecordInfo)`` of each key (matching the glob ``pattern``, if given), read
        from the records' bytes without unpickling anything (``pstore ls``). Inside a
        transaction, :class:`~pstore.errors.InTransactionError` while a value assigned in it
        waits for the commit to be written."""
        with self._lock:
            self._check_open()
            items = list(self._records("describe the records").iter_items())
        from . import inspection

        yield from inspection.describe_items(self._path, items, pattern, self._renames)

    def raw_record(self, key: str) -> tuple[int, bytes]:
        """``(object id, stored bytes)`` of the record ``key`` is bound to, as they are: for
        tools that look at records without loading them (``pstore show``, ``dis``). Inside a
        transaction that assigned ``key`` a new value, :class:`~pstore.errors.InTransactionError`
        (its record is written at the commit)."""
        from . import inspection

        with self._lock:
            self._check_open()
            self._check_key(key)
            return inspection.raw_record(self._records("read a raw record", key), key)

    def verify(self) -> VerifyReport:
        """Check every record's digest, reference, key binding and blob (its contents
        hashed again), unpickling nothing; return what was found (``report.ok``). Inside a
        transaction, :class:`~pstore.errors.InTransactionError` while a value assigned in it
        waits for the commit to be written."""
        with self._lock:
            self._check_open()
            return verify(self._records("verify the records"),
                          max_record_size=self._max_record_size, signer=self._signer)

    # -- safety: inspect, trust, load restricted (docs/safety.md) ----------------------------

    def globals(self, key: str | None = None) -> list[str]:
        """Every ``module.name`` the records reachable from ``key`` (or all records) would
        import, across every pickle of each record (a Persistent object's state too),
        sorted; nothing is unpickled or imported. What to review before :meth:`trust`."""
        from . import inspection

        with self._lock:
            self._check_open()
            return inspection.store_globals(self._records("list the globals of records", key), key)

    def trust(self, keys: str | Iterable[str] | None = None) -> int:
        """Sign with this Store's key the records reachable from ``keys`` (one key or
        several) or, with None, every record: from now on they load with full pickle
        semantics. Review :meth:`globals` first: a trusted record runs what it names.
        Each record's digest is checked before it is signed (damage is never signed).
        One transaction; returns how many records were signed anew."""
        from . import inspection

        with self._lock:
            self._check_writable("trust records")
            with self._transaction():
                signed = self._txn.sign(inspection.reachable_ids(self._keys(), keys),
                                        self._max_record_size)
            # Objects loaded restricted stay as they are; the next load is a full one.
            self._fresh.invalidate()
            return signed

    def load_restricted(self, key: str, *, allow: str | Iterable[str] = ()) -> Any:
        """The value of ``key`` loaded under restricted loading whatever its signature
        (``pstore show``): only the data policy's globals, this Store's ``allow=`` and
        ``allow`` resolve; anything else raises :class:`~pstore.errors.UntrustedError`.
        Objects this Store loaded before are returned as they are."""
        with self._lock:
            self._check_open()
            self._check_key(key)
            with self._loader.restricting(allow):
                return self[key]

    def close(self) -> None:
        """Commit the changed Persistent objects, write back the cache (``writeback=True``)
        and close. Idempotent.

        Inside a transaction, the transaction is rolled back instead. Loaded
        Persistent objects become objects of no store; placeholders raise
        :class:`~pstore.errors.ClosedError` when used.
        """
        with self._lock:
            if self._closed:
                return
            try:
                if self._txn.depth:
                    self._txn.rollback()
                else:
                    if self._fresh.held:    # ended first: the write-back may write
                        self._end_snapshot()
                    self._write_back()
            finally:
                self._closed = True
                self._txn.discard_unsaved()
                for obj in self._ids.persistent_objects():
                    if status_of(obj) != GHOST:
                        detach(obj)
                self._ids.clear()
                _open_stores.pop(id(self), None)
                self._backend.close()

    #: ``(path, flag, options)`` for :func:`open` to open this store again elsewhere; set
    #: by :func:`open`. None for a Store made otherwise, which cannot be pickled.
    reopen_arguments: tuple[str, str, dict[str, Any]] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        """A Store pickles as "open this store again": sent to another process (a
        ``spawn`` pool, ``multiprocessing``), it arrives as a Store of its own on the same
        path with the same options -- flag 'r' stays 'r', any other becomes 'w'."""
        if self.reopen_arguments is None:
            raise StorePicklingError(self._path, "it was not made by pstore.open")
        if self._closed:
            raise ClosedError(self._path)
        if self.in_transaction:
            raise StorePicklingError(self._path, "inside a transaction: the other process "
                                     "would not see what it has not committed")
        from .opening import reopen

        return reopen, self.reopen_arguments

    def __enter__(self) -> Store:
        self._check_open()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Close; on an exception, first drop the writeback cache and the changes of
        Persistent objects instead of writing them."""
        if exc_type is not None:
            with self._lock:
                self._txn.discard_unsaved()
        self.close()

    # -- the data manager of Persistent objects -------------------------------------------

    def setstate(self, obj: Persistent) -> None:
        """Load the state of placeholder ``obj`` (called by its first attribute access);
        see :class:`~pstore.store.persistent.DataManager`."""
        with self._lock:
            self._check_open()
            if status_of(obj) != GHOST:     # another thread loaded it meanwhile
                return
            self._loader.fill_placeholder(obj)

    def register(self, obj: Persistent) -> None:
        """Called on the first change of ``obj`` since it was written: write it at the next
        commit. On a read-only or closed store the change stays in memory."""
        with self._lock:
            if not self._closed and not self._read_only:
                self._txn.note_changed(obj)

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(self._path)

    def _check_writable(self, operation: str) -> None:
        self._check_open()
        if self._read_only:
            raise ReadOnlyError(self._path, operation)
        if self._fresh.held:
            raise InTransactionError(self._path, operation, "snapshot")

    @staticmethod
    def _check_key(key: Any) -> None:
        if not isinstance(key, str):
            raise KeyTypeError(type(key).__name__)
        if not _storable_key(key):
            raise ArgumentError("a key", key, "a str that encodes to UTF-8 (a lone surrogate "
                                "does not)")

    def _keys(self) -> ReadableBackend:
        """The backend, for a read of keys: in a transaction, once the keys it bound are
        sent to the backend, so that the read sees them."""
        self._txn.flush_binds()
        return self._backend

    def _records(self, operation: str, key: str | None = None) -> ReadableBackend:
        """The backend, for a tool that reads records' bytes (of ``key``'s record, or of
        all). Refused inside a write transaction while a value assigned in it (to ``key``)
        is still to be written: its key is bound, but its record is made only at commit."""
        backend = self._keys()
        pending = self._txn.pending
        if pending and (key is None or backend.get_key(key) in pending):
            what = "every record" if key is None else f"the record of key {key!r}"
            raise InTransactionError(self._path, f"{operation} before {what} is written "
                                     "(a value assigned in a transaction is written at "
                                     "its commit)")
        return backend

    def _load_latest(self, oid: int, data: bytes | None) -> Any:
        """Outside a transaction: the object of record ``oid``, whose bytes ``data`` were
        just read, with the identity map brought up to date before it is used.

        The map is used only when it has an object for ``oid`` or when the record refers
        to others: only then is the change marker read (a query), so a record that refers
        to nothing is read with one query. Its bytes are current whatever the marker says.
        """
        if self._ids.get(oid) is not None:
            self._fresh.see_latest()
            return self._loader.load(oid, data)
        return self._loader.load_fresh(oid, data, self._fresh.see_latest)

    def _transaction(self, flush_cache: bool = False) -> AbstractContextManager[None]:
        """The write transaction's scope (joined if one is open)."""
        self._fresh.forget_keys()  # the transaction may bind keys anew (or roll back)
        return self._txn.scope(flush_cache, self._fresh.see_latest, self._check_open)

    def _after_fork(self) -> None:
        # The parent's lock may have been held by one of its other threads.
        self._lock = threading.RLock()
        if self._closed:
            return
        forked_in_transaction = self._txn.depth > 0 or self._fresh.held
        self._txn.forget()
        if forked_in_transaction:
            # The parent's transaction (or snapshot) is the parent's: SQLite's in-process
            # lock bookkeeping, copied by fork(), would keep the child from ever writing.
            # The child's copy is closed (the parent's connection is left alone); reopen it.
            self._fresh.held = False
            self._closed = True
            return
        try:
            self._backend.after_fork()
            self._fresh.reset()
        except Exception:
            # Surface the failure at the child's first call, in the calling thread.
            self._closed = True
            return
        self._fresh.invalidate()   # the parent may have committed since it loaded them


# Keyed by id(): a Store, being a Mapping, is unhashable.
_open_stores: weakref.WeakValueDictionary[int, Store] = weakref.WeakValueDictionary()


def _reopen_in_child() -> None:
    for store in list(_open_stores.values()):
        store._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reopen_in_child)


def _storable_key(key: str) -> bool:
    """Whether str ``key`` encodes to UTF-8, as every backend stores keys."""
    if key.isascii():
        return True
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
