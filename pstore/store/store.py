"""The Store: a persistent ``MutableMapping[str, object]`` with shared objects kept shared.

Every stored object is a record with an integer object id; keys bind names to
object ids. A record's pickle refers to any other object already in the store
(loaded from it, or saved to it, by this Store) by that object's id, through
the engine's ``persistent_id``/``persistent_load`` hooks, and loading goes
through an :class:`~pstore.store.identity.IdentityMap`, so within one open
Store an object id is one Python object. Objects of
:class:`~pstore.store.persistent.Persistent` classes are referred to lazily: a
reference loads as a placeholder that reads its record when first used. See
``docs/store.md`` and ``docs/persistent.md``.
"""

from __future__ import annotations

import fnmatch
import io
import os
import threading
import weakref
from collections.abc import Callable, Collection, ItemsView, Iterator, MutableMapping, ValuesView
from contextlib import contextmanager
from itertools import islice
from typing import Any

from .. import engine
from ..backends import Backend, detect_backend, open_backend
from ..errors import ClosedError, CorruptionError, MissingObjectError, ReadOnlyError
from . import blobio, inspection, records, tensors
from . import compute as compute_once
from .verify import VerifyReport, load_error, verify
from .identity import IdentityMap, is_tracked
from .persistent import (CHANGED, GHOST, SAVED, Persistent, attach, detach, fill, ghostify,
                         is_ghost, placeholder, set_status, status_of)

__all__ = ["Store", "open", "DEFAULT_LOCK_TIMEOUT", "DEFAULT_BLOB_THRESHOLD",
           "DEFAULT_MAX_RECORD_SIZE"]

#: Seconds a write waits for another process's write transaction by default.
DEFAULT_LOCK_TIMEOUT = 60.0
#: Out-of-band buffers of at least this many bytes are stored as blobs by default.
DEFAULT_BLOB_THRESHOLD = 64 * 1024
#: A record's payload larger than this (decompressed) is refused by default.
DEFAULT_MAX_RECORD_SIZE = 1 << 30

_FLAGS = ("r", "w", "c", "n")
_END = object()


class _RecordPickler(engine.Pickler):
    """Pickles the records of one Store, one at a time.

    Objects already in the store, except the record's root, become references:
    their object id, or ``(object id, class)`` for a Persistent object (so that a
    placeholder of the right class can be made without reading its record). A
    Persistent object not yet in the store is given to ``adopt``, which returns
    its new object id. Under protocol 5, each out-of-band buffer (``PickleBuffer``)
    of at least ``blob_threshold`` bytes goes to ``write_blob`` as it is met, so a
    large array is streamed to its blob and never copied into the pickle. One
    instance serves every record, so that the engine prepares its dump once.
    """

    def __init__(self, protocol: int, oid_of: dict[int, int],
                 adopt: Callable[[Persistent], int], blob_threshold: float,
                 write_blob: Callable[[memoryview], records.BlobRef]) -> None:
        self._file = io.BytesIO()
        super().__init__(self._file, protocol,
                         buffer_callback=self._out_of_band if protocol >= 5 else None)
        self._oid_of = oid_of.get
        # A plain container whose id is not in the identity map is not a record: the engine
        # (in C) takes persistent_id's answer to be None without calling it.
        self.persistent_id_for_ids = oid_of
        self._adopt = adopt
        self._blob_threshold = blob_threshold
        self._write_blob = write_blob
        self._root: Any = None
        self._refs: dict[int, Any] = {}
        self._blobs: list[records.BlobRef] = []
        self._class_pickles: dict[type, bytes] = {}     # the first pickle of a Persistent record
        self._tensors: tensors.TensorReducer | None = None  # once torch is imported

    # Atoms are never in the identity map, nor Persistent: no need to ask about them.
    persistent_id_for_atoms = False

    def persistent_id(self, obj: Any) -> Any:
        # Called for every object pickled but atoms: one dict lookup and one type check.
        oid = self._oid_of(id(obj))
        if oid is None:
            if not isinstance(obj, Persistent):
                return None
            oid = self._adopt(obj)
        elif obj is self._root:
            return None
        elif not isinstance(obj, Persistent):
            self._refs[oid] = obj
            return oid
        self._refs[oid] = obj
        cls = type(obj)
        if self.bin:
            return oid, cls
        # Protocol 0 persistent ids are ASCII text.
        return f"{oid} {cls.__module__} {cls.__qualname__}"

    def _out_of_band(self, buffer: engine.PickleBuffer) -> bool:
        raw = buffer.raw()
        if raw.nbytes < self._blob_threshold:
            return True     # in-band
        self._blobs.append(self._write_blob(raw))
        return False

    def pickle(self, root: Any) -> tuple[bytes, dict[int, Any], list[records.BlobRef]]:
        """The pickle of ``root``, {object id: object} of every reference written, and
        the blobs of its out-of-band buffers, in order."""
        file = self._file
        file.seek(0)
        file.truncate()
        self._root = root
        self._refs = refs = {}
        self._blobs = blobs = []
        try:
            self._dump_value(root)
        finally:
            self._root = None
            self.clear_memo()   # the memo holds the record's objects alive
        return file.getvalue(), refs, blobs

    def _dump_value(self, value: Any) -> None:
        """dump(value), with torch tensors out of band while torch is imported."""
        if self._tensors is None:
            torch = tensors.torch_if_imported()
            if torch is None:
                self.dump(value)
                return
            self._tensors = tensors.TensorReducer(torch)
            self.reducer_override = self._tensors.reduce
        try:
            self.dump(value)
        finally:
            self._tensors.clear()

    def pickle_persistent(self, obj: Persistent
                          ) -> tuple[bytes, dict[int, Any], list[records.BlobRef]]:
        """The record of Persistent ``obj`` -- a pickle of its class, then one of its
        state -- {object id: object} of every reference written, and the blobs of the
        state's out-of-band buffers, in order."""
        file = self._file
        file.seek(0)
        file.truncate()
        self._refs = refs = {}
        self._blobs = blobs = []
        cls = type(obj)
        try:
            # A class pickles to the same bytes every time: pickled once per class.
            head = self._class_pickles.get(cls)
            if head is None:
                self.dump(cls)
                self.clear_memo()
                self._class_pickles[cls] = file.getvalue()
            else:
                file.write(head)
            self._dump_value(obj.__getstate__())
        finally:
            self.clear_memo()
        return file.getvalue(), refs, blobs


class _RecordUnpickler(engine.Unpickler):
    """Unpickles the records of one Store, resolving references through its identity
    map: an object id loads that record, ``(object id, class)`` gives a placeholder of
    a Persistent object (its record is not read).

    One instance serves every record, nested loads of referenced records included
    (``load_bytes_at`` keeps each pickle's state apart), so a record costs no setup.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(io.BytesIO())   # records are read with load_bytes_at, never from the file
        # A proxy: the Store holds this unpickler, and a cycle would keep a dropped Store
        # (and its open connection) alive until the garbage collector runs.
        self._store = weakref.proxy(store)

    def persistent_load(self, pid: Any) -> Any:
        store = self._store
        if store._check_on_reference:
            store._check_on_reference = False
            store._see_latest()
        kind = type(pid)
        if kind is int:
            return store._load(pid)
        if kind is tuple and len(pid) == 2 and type(pid[0]) is int:
            return store._placeholder(*pid)
        if kind is str:     # protocol 0 writes persistent ids as text
            oid, _, cls = pid.partition(" ")
            if oid.isdigit():
                if not cls:
                    return store._load(int(oid))
                module, _, qualname = cls.partition(" ")
                head, *attributes = qualname.split(".")
                found = self.find_class(module, head)
                for attribute in attributes:
                    found = getattr(found, attribute)
                return store._placeholder(int(oid), found)
        raise engine.UnpicklingError(f"a record refers to {pid!r}, which is not an object id")


#: How deep loads of referenced records may nest before the chain is loaded from its far end.
_LOAD_DEPTH_LIMIT = 50


class _LoadFirst(Exception):
    """Internal: abandon this nested load; the top-level load loads ``oid`` first."""

    def __init__(self, oid: int) -> None:
        super().__init__(oid)
        self.oid = oid


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
    """

    def __init__(self, backend: Backend, *, protocol: int, writeback: bool,
                 blob_threshold: int | None = DEFAULT_BLOB_THRESHOLD,
                 compression: str | None = None, readonly_buffers: bool = False,
                 max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> None:
        self._backend = backend
        self._max_record_size = max_record_size
        self._path = backend.path
        self._writeback = writeback and not backend.read_only
        self._lock = threading.RLock()
        self._ids = IdentityMap()
        self._codec = blobio.CODECS[compression]
        self._writable_buffers = not readonly_buffers
        self._pickler = _RecordPickler(
            protocol, self._ids.oid_of, self._adopt,
            float("inf") if blob_threshold is None else blob_threshold, self._write_blob)
        self._unpickler = _RecordUnpickler(self)
        self._marker = backend.change_marker()
        self._closed = False
        self._load_depth = 0        # how many record loads are nested right now
        # Whether the load under way must read the change marker before it resolves a
        # reference through the identity map (see _load_latest).
        self._check_on_reference = False
        self._depth = 0             # nesting depth of the open transaction (0: none)
        self._flush_cache = False   # whether the open transaction writes the writeback cache
        # The open transaction's work, done at commit so that its values may refer to
        # one another in any order:
        self._pending: dict[int, tuple[Any, str | None]] = {}   # oid -> (object, key)
        self._released: set[int] = set()    # oids a key stopped naming
        self._new_oids: set[int] = set()    # oids allocated by the transaction
        self._bound: dict[int, Persistent] = {}     # saved Persistent objects a key was bound to
        self._cache: dict[int, Any] = {}    # writeback=True: oid -> object to write back
        self._baseline: dict[int, bytes] = {}   # writeback=True: oid -> its record as last seen
        # Persistent objects changed since they were written, until the next commit:
        self._changed: dict[int, Persistent] = {}
        self._classes: dict[bytes, type[Persistent]] = {}   # first pickle of a record -> class
        _open_stores[id(self)] = self

    # -- state ------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The path (or location) the store was opened with."""
        return self._path

    @property
    def read_only(self) -> bool:
        """True when opened with flag 'r'."""
        return self._backend.read_only

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
            self._check_key(key)
            self._check_open()
            try:
                item = self._backend.get_item(key)
                if item is not None:
                    oid, data = item
                    if self._depth:     # the transaction saw the latest state when it began
                        obj = self._load(oid, data)
                    else:
                        obj = self._load_latest(oid, data)
            except Exception as error:
                raise load_error(error, self._path, key=key, is_damage=self._backend.is_damage)
            if item is None:
                raise KeyError(key)
            if self._writeback:
                self._keep(oid, obj, data)
            self._ids.maybe_sweep()
            return obj

    def __setitem__(self, key: str, value: Any) -> None:
        with self._lock:
            self._check_key(key)
            self._check_writable("assign to a key")
            if self._depth:     # joins the open transaction: no need for a context of its own
                self._assign(key, value)
                return
            with self._transaction():
                self._assign(key, value)

    def __delitem__(self, key: str) -> None:
        with self._lock:
            self._check_key(key)
            self._check_writable("delete a key")
            with self._transaction():
                oid = self._backend.unbind_key(key)
                if oid is None:
                    raise KeyError(key)
                self._released.add(oid)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        with self._lock:
            # Here, in __len__ and in __iter__ the identity map is not used: no need to
            # look for other processes' commits first.
            self._check_open()
            try:
                return self._backend.get_key(key) is not None
            except Exception as error:
                raise load_error(error, self._path, key=key, is_damage=self._backend.is_damage)

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            try:
                return self._backend.count_keys()
            except Exception as error:
                raise load_error(error, self._path, is_damage=self._backend.is_damage)

    def __iter__(self) -> Iterator[str]:
        """Stream the keys (in sorted order for the SQLite backend), a batch at a time.

        Outside a transaction, keys bound or unbound while iterating may or may not
        be seen; inside one, the iteration sees the transaction's state.
        """
        with self._lock:
            self._check_open()
            keys = self._backend.iter_keys()
        while True:
            with self._lock:
                self._check_open()
                try:
                    key = next(keys, _END)
                except Exception as error:
                    raise load_error(error, self._path, is_damage=self._backend.is_damage)
            if key is _END:
                return
            yield key

    def items(self) -> ItemsView[str, Any]:
        """A view whose iteration streams ``(key, value)`` pairs, a batch of records per query."""
        return _Items(self)

    def values(self) -> ValuesView[Any]:
        """A view whose iteration streams the values, a batch of records per query."""
        return _Values(self)

    def _iter_items(self) -> Iterator[tuple[str, Any]]:
        with self._lock:
            self._start_read()
            rows = self._backend.iter_items()
        while True:
            with self._lock:
                self._check_open()
                key = None
                try:
                    row = next(rows, _END)
                    if row is _END:
                        return
                    key, oid, data = row
                    value = self._load(oid, data)
                except Exception as error:
                    raise load_error(error, self._path, key=key,
                                     is_damage=self._backend.is_damage)
                if self._writeback:
                    self._keep(oid, value, data)
                self._ids.maybe_sweep()
            yield key, value

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Assign every pair, in one transaction (all or nothing)."""
        with self.transaction():
            super().update(other, **kwargs)

    def clear(self) -> None:
        """Delete every key, in one transaction."""
        with self.transaction():
            while True:
                batch = list(islice(self._backend.iter_keys(), 1000))
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

    @property
    def in_transaction(self) -> bool:
        """True while the calling thread has a :meth:`transaction` of this Store open."""
        with self._lock:    # another thread's transaction holds it until its end
            return self._depth > 0

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
        return compute_once.get_or_compute(self, key, compute, key_lock=self._backend.key_lock,
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
        return compute_once.memoize(self, func, name=name, check_code=check_code)

    def sync(self) -> None:
        """Commit the changed Persistent objects and write back the cached objects
        (``writeback=True``), then see what other processes committed.

        Every other write is already committed when it returns. Inside a
        transaction it does nothing (the transaction's end commits).
        """
        with self._lock:
            self._check_open()
            if self._depth:
                return
            self._write_back()
            self._see_latest()

    def _write_back(self) -> None:
        """Outside a transaction: commit the changed Persistent objects and the cache."""
        if self._cache or self._changed:
            with self._transaction(flush_cache=True):
                pass

    def gc(self) -> int:
        """Delete the records no key reaches; return how many. Other processes keep reading."""
        with self._lock:
            self._check_writable("collect garbage")
            with self._transaction():
                return self._backend.gc()

    def vacuum(self) -> int:
        """Give the space of deleted records back to the file system; return how many bytes
        the store's files shrank by. Run :meth:`gc` first to delete what no key reaches.
        Takes the write lock; other processes keep reading. Not inside a transaction."""
        with self._lock:
            self._check_writable("vacuum")
            if self._depth:
                raise ValueError("vacuum() cannot run inside a transaction")
            return self._backend.vacuum()

    def info(self) -> inspection.StoreInfo:
        """Counts and sizes of what the store holds (``pstore info``); reads only."""
        with self._lock:
            self._check_open()
            stats = self._backend.statistics()
            return inspection.StoreInfo(
                self._path, self._backend.name, stats.module, stats.format_version,
                self._backend.count_keys(), stats.records, stats.record_bytes, stats.blobs,
                stats.blob_bytes)

    def describe(self, pattern: str | None = None) -> Iterator[tuple[str, inspection.RecordInfo]]:
        """``(key, RecordInfo)`` of each key (matching the glob ``pattern``, if given), read
        from the records' bytes without unpickling anything (``pstore ls``)."""
        with self._lock:
            self._check_open()
            items = list(self._backend.iter_items())
        for key, oid, data in items:
            if pattern is not None and not fnmatch.fnmatchcase(key, pattern):
                continue
            if data is None:
                raise MissingObjectError(self._path, oid, f"the record of key {key!r}")
            yield key, inspection.describe_record(oid, data)

    def raw_record(self, key: str) -> tuple[int, bytes]:
        """``(object id, stored bytes)`` of the record ``key`` is bound to, as they are: for
        tools that look at records without loading them (``pstore show``, ``dis``)."""
        with self._lock:
            self._check_key(key)
            self._check_open()
            item = self._backend.get_item(key)
            if item is None:
                raise KeyError(key)
            oid, data = item
            if data is None:
                raise MissingObjectError(self._path, oid, f"the record of key {key!r}")
            return oid, data

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
                if self._depth:
                    self._rollback()
                else:
                    self._write_back()
            finally:
                self._closed = True
                self._cache.clear()
                self._baseline.clear()
                self._changed.clear()
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
            raise TypeError("this Store was not made by pstore.open: it cannot be pickled")
        if self._closed:
            raise ClosedError(self._path)
        if self.in_transaction:
            raise TypeError(f"cannot pickle store {self._path!r} inside a transaction: the "
                            f"other process would not see what it has not committed")
        path, flag, options = self.reopen_arguments
        return _reopen, (path, flag, options)

    def __enter__(self) -> Store:
        self._check_open()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Close; on an exception, first drop the writeback cache and the changes of
        Persistent objects instead of writing them."""
        if exc_type is not None:
            with self._lock:
                self._cache.clear()
                self._changed.clear()
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(self._path)

    def _check_writable(self, operation: str) -> None:
        self._check_open()
        if self._backend.read_only:
            raise ReadOnlyError(self._path, operation)

    @staticmethod
    def _check_key(key: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"pstore keys must be str, not {type(key).__name__}")

    def _start_read(self) -> None:
        """Outside a transaction: drop loaded objects if another process committed since."""
        self._check_open()
        if not self._depth:
            self._see_latest()

    def _load_latest(self, oid: int, data: bytes) -> Any:
        """Outside a transaction: the object of record ``oid``, whose bytes ``data`` were
        just read, with the identity map brought up to date before it is used.

        The map is used only when it has an object for ``oid`` or when the record refers
        to others: only then is the change marker read (a query), so a record that refers
        to nothing is read with one query. Its bytes are current whatever the marker says.
        """
        if self._ids.get(oid) is not None:
            self._see_latest()
            return self._load(oid, data)
        self._check_on_reference = True     # read by _RecordUnpickler.persistent_load
        try:
            return self._load(oid, data)
        finally:
            self._check_on_reference = False

    def _see_latest(self) -> None:
        marker = self._backend.change_marker()
        if marker != self._marker:
            self._marker = marker
            self._invalidate()

    def _invalidate(self) -> None:
        """Make every record load again: forget the plain objects loaded, and turn the
        Persistent objects without unsaved changes back into placeholders."""
        self._ids.forget_loads()
        for obj in self._ids.persistent_objects():
            if status_of(obj) == SAVED:
                ghostify(obj)

    @contextmanager
    def _transaction(self, flush_cache: bool = False) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            self._flush_cache = self._flush_cache or flush_cache
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._backend.begin()
        self._depth = 1
        self._flush_cache = flush_cache
        try:
            self._see_latest()
            yield
            self._commit()
        except BaseException:
            self._rollback()
            raise
        finally:
            self._depth = 0

    def _assign(self, key: str, value: Any) -> None:
        oid = self._ids.oid_of.get(id(value))
        if isinstance(value, Persistent):
            if oid is None:
                oid = self._adopt(value)
            old = self._backend.bind_key(key, oid)
            if old is not None and old != oid:
                self._released.add(old)
            if oid in self._new_oids:
                self._pending[oid] = (value, key)
            else:
                # Its record is up to date, or it is in _changed and written anyway.
                self._bound[oid] = value
            return
        if oid is None:
            oid = self._backend.new_oid()
            self._new_oids.add(oid)
        if is_tracked(value):
            current = self._ids.get(oid)
            if current is not None and current is not value:
                # Two objects for one record (the held one predates another process's
                # commit): loaded objects may contain the other one, so reload them all.
                self._ids.forget_loads()
            self._ids.add(value, oid)
            if self._writeback:
                self._cache[oid] = value
        old = self._backend.bind_key(key, oid)
        if old is not None and old != oid:
            self._released.add(old)
        self._pending[oid] = (value, key)

    def _commit(self) -> None:
        self._check_open()
        pending = self._pending
        for oid, obj in self._changed.items():
            pending.setdefault(oid, (obj, None))
        write_back: set[int] = set()    # cached objects written only if they changed
        if self._flush_cache:
            for oid, obj in self._cache.items():
                if oid not in pending:
                    pending[oid] = (obj, None)
                    write_back.add(oid)
        written: set[int] = set()
        # Plain records written now that refer to others -> the records loading them loads
        # at once: references to Persistent objects load lazily, so a cycle through one is
        # harmless.
        eager: dict[int, Collection[int]] = {}
        referenced: dict[int, Any] = dict(self._bound)
        # Empty while this Store holds no Persistent object: then nothing written is one,
        # or refers to one.
        persistent = self._ids.persistent
        batch = list(pending.items())
        while batch:
            for oid, (obj, key) in batch:
                data, refs, blobs = self._pickle(obj, key, oid)
                written.add(oid)
                if oid in write_back and self._baseline.get(oid) == data:
                    continue
                lazy: Collection[int] = ()
                if refs:
                    referenced.update(refs)
                    if not persistent:
                        eager[oid] = refs
                    else:
                        lazy = {ref for ref, target in refs.items()
                                if isinstance(target, Persistent)}
                        if not isinstance(obj, Persistent):
                            eager[oid] = [ref for ref in refs if ref not in lazy]
                self._backend.put_record(oid, data, refs, lazy_refs=lazy,
                                         blobs=[blob.name for blob in blobs])
                if oid in self._cache:
                    self._baseline[oid] = data
            # A referenced object whose record is gone (deleted by gc() or by releasing
            # its last key, here or in another process) is written again from memory;
            # so is a Persistent object first met while pickling (its object id is new).
            unwritten = referenced.keys() - written
            new = unwritten & self._new_oids
            old = unwritten - new
            missing = new | (old - self._backend.existing(old))
            batch = [(oid, (referenced[oid], None)) for oid in missing]
        cyclic = self._closes_a_cycle(eager)
        if cyclic is not None:
            raise engine.PicklingError(
                f"cannot store {self._describe(cyclic)}: it refers (through other stored "
                f"objects) back to itself, and pstore cannot load a cycle of records; "
                f"store the objects of the cycle under one key, or make one of them "
                f"a pstore.Persistent object")
        for oid in self._released:
            if not self._backend.is_referenced(oid):
                self._backend.delete_record(oid)
        self._backend.commit()
        self._changed.clear()
        if self._flush_cache:
            self._cache.clear()
            self._baseline.clear()
        self._end_transaction()

    def _closes_a_cycle(self, eager: dict[int, Collection[int]]) -> int | None:
        """A plain record written now that loading would reach again from itself, or None.

        ``eager``: each plain record written now that refers to plain records -> those.
        The committed plain records form no such cycle (a Persistent object, loaded
        lazily, never is on one), so a new cycle passes through a record written
        now. Records created by this transaction can only be referred to by records
        written now; so when it rewrote no existing plain record, a cycle lies among
        the records written now, and one walk of their references in memory finds it.
        Otherwise each rewritten record asks the backend whether it reaches itself.
        """
        if eager.keys() <= self._new_oids:
            return _cycle_among(eager)
        targets = {ref for refs in eager.values() for ref in refs}
        for oid, refs in eager.items():
            may_close_a_cycle = oid in targets or oid not in self._new_oids
            if refs and may_close_a_cycle and self._backend.reaches(refs, oid):
                return oid
        return None

    def _rollback(self) -> None:
        try:
            self._backend.rollback()
        finally:
            self._forget_transaction()

    def _forget_transaction(self) -> None:
        """Undo in memory what the open transaction did: forget the objects it stored first,
        and make the records it rewrote load again.

        Persistent objects it stored first become objects of no store again (with the
        state they have); those with uncommitted changes become placeholders, so
        they load their committed state when next used.
        """
        for oid in self._new_oids:
            obj = self._ids.get(oid)
            if isinstance(obj, Persistent):
                detach(obj)
        for obj in self._changed.values():
            if obj._p_store is self:
                ghostify(obj)
        self._changed.clear()
        self._ids.remove_oids(self._new_oids)
        self._ids.forget_loads(self._pending)
        if self._flush_cache:
            self._cache.clear()
            self._baseline.clear()
        self._end_transaction()

    def _end_transaction(self) -> None:
        self._pending.clear()
        self._bound.clear()
        self._released.clear()
        self._new_oids.clear()
        self._flush_cache = False
        self._ids.maybe_sweep()

    def _describe(self, oid: int) -> str:
        entry = self._pending.get(oid)
        if entry is not None and entry[1] is not None:
            return f"the value of key {entry[1]!r}"
        return f"object id {oid}"

    def _pickle(self, obj: Any, key: str | None,
                oid: int) -> tuple[bytes, dict[int, Any], list[records.BlobRef]]:
        """The record of ``obj`` (its blobs already written), its references and its blobs."""
        try:
            if isinstance(obj, Persistent):
                # Marked saved before its state is read: a change made from now on
                # (by another thread) marks it changed again, for the next commit.
                if status_of(obj) == CHANGED:
                    set_status(obj, SAVED)
                pickle, refs, blobs = self._pickler.pickle_persistent(obj)
            else:
                pickle, refs, blobs = self._pickler.pickle(obj)
        except Exception as error:
            what = f"the value of key {key!r}" if key is not None else self._describe(oid)
            raise engine.PicklingError(f"cannot store {what}: {error}") from error
        return records.pack(oid, pickle, blobs, self._codec), refs, blobs

    def _write_blob(self, raw: memoryview) -> records.BlobRef:
        return blobio.write_blob(self._backend, raw, self._codec)

    def _unwrap(self, oid: int, data: bytes | None) -> tuple[bytes, list[Any] | None, bool]:
        """The payload of record ``oid`` (reading it unless ``data`` is given), checked, its
        out-of-band buffers (or None), and whether a digest verified it."""
        backend = self._backend
        try:
            if data is None:
                data = backend.get_record(oid)
            if data is None:
                raise MissingObjectError(self._path, oid)
            payload, blobs, verified = records.unpack(
                data, oid, digest_required=oid >= backend.digests_from,
                max_size=self._max_record_size)
            buffers = [blobio.read_blob(backend, blob, self._writable_buffers)
                       for blob in blobs] if blobs else None
        except Exception as error:
            raise load_error(error, self._path, object_id=oid, is_damage=backend.is_damage)
        return payload, buffers, verified

    def verify(self) -> VerifyReport:
        """Check every record's digest, reference, key binding and blob (its contents
        hashed again), unpickling nothing; return what was found (``report.ok``)."""
        with self._lock:
            self._check_open()
            return verify(self._backend, max_record_size=self._max_record_size)

    def _load(self, oid: int, data: bytes | None = None) -> Any:
        """The object of record ``oid``; ``data``, if given, is the record's (already read).

        Also the unpickler's ``persistent_load``: a record's references are loaded while
        it is unpickled, by recursion. So that a chain of records of any length loads,
        a load nested more than ``_LOAD_DEPTH_LIMIT`` deep is abandoned (nothing of it
        was registered yet) and the top-level load first loads the record it needed,
        then tries again: chains load from their far end, a bounded stretch at a time.
        """
        entry = self._pending.get(oid)
        if entry is not None:
            return entry[0]
        obj = self._ids.get(oid)
        if obj is not None and (data is None or not is_ghost(obj)):
            return obj
        if self._load_depth >= _LOAD_DEPTH_LIMIT:
            raise _LoadFirst(oid)
        if self._load_depth:
            return self._unpickle(oid, None)
        return self._load_outermost(oid, data)

    def _load_outermost(self, oid: int, data: bytes | None) -> Any:
        """Load record ``oid`` (or fill its placeholder) as the outermost load: when a
        nested load goes too deep, load the record it needed first, then try again."""
        wanted = [oid]      # records to load, the last one first
        held = []           # what was loaded, alive until the whole load is done
        while True:
            current = wanted[-1]
            try:
                obj = self._unpickle(current, data if current == oid else None)
            except _LoadFirst as deeper:
                if deeper.oid in wanted:
                    raise CorruptionError(self._path, "its records refer to one another in "
                                          "a cycle", object_id=deeper.oid) from None
                wanted.append(deeper.oid)
                continue
            if len(wanted) == 1:
                return obj
            held.append(obj)
            wanted.pop()

    def _unpickle(self, oid: int, data: bytes | None) -> Any:
        """Unpickle record ``oid`` (reading it unless ``data`` is given) and register it."""
        data, buffers, verified = self._unwrap(oid, data)
        self._load_depth += 1
        try:
            unpickler = self._unpickler
            known = self._known_class(data) if self._classes else None
            if known is None:
                obj, end = unpickler.load_bytes_at(data, 0, buffers)
            else:
                obj, end = known
            if end < len(data):     # a Persistent object's record: class, then state
                return self._load_state(oid, obj, data, end, buffers)
        except _LoadFirst:
            raise
        except Exception as error:
            raise load_error(error, self._path, object_id=oid, decoded=verified,
                             is_damage=self._backend.is_damage)
        finally:
            self._load_depth -= 1
        if is_tracked(obj):
            self._ids.add(obj, oid)
        return obj

    # -- Persistent objects ---------------------------------------------------------------

    def _known_class(self, data: bytes) -> tuple[type[Persistent], int] | None:
        """The class of a Persistent object's record ``data`` whose first pickle this Store
        has read before, and where that pickle ends; or None."""
        for head, cls in self._classes.items():
            # A pickle ends where its STOP is: data that starts with a whole pickle has
            # it as its first pickle.
            if data.startswith(head) and len(data) > len(head):
                return cls, len(head)
        return None

    def _load_state(self, oid: int, cls: Any, data: bytes, start: int,
                    buffers: list[Any] | None) -> Persistent:
        """Load the state of Persistent record ``oid`` into its object (its placeholder, or
        a new object of ``cls``): the pickle at ``start`` of ``data``, whose first pickle
        is that of ``cls``; ``buffers`` are the state's out-of-band buffers."""
        if not (isinstance(cls, type) and issubclass(cls, Persistent)):
            raise CorruptionError(self._path, f"the record holds two pickles, but the first "
                                  f"is {cls!r}, not a pstore.Persistent class", object_id=oid)
        # Unpickling the class once per Store is enough: find_class resolved it.
        self._classes[data[:start]] = cls
        obj = self._ids.get(oid)
        if obj is None:
            obj = placeholder(cls, self, oid)
            # In the map before its state loads: the state may refer to the object itself.
            self._ids.add(obj, oid, persistent=True)
        elif status_of(obj) != GHOST:
            return obj
        fill(obj, lambda: self._unpickler.load_bytes_at(data, start, buffers)[0])
        return obj

    def _placeholder(self, oid: int, cls: Any) -> Any:
        """The object of a reference to Persistent record ``oid``: the loaded object, or a
        new placeholder of ``cls`` (its record is not read)."""
        obj = self._ids.get(oid)
        if obj is not None:
            return obj
        if not (isinstance(cls, type) and issubclass(cls, Persistent)):
            raise engine.UnpicklingError(f"a record refers to object id {oid} as a {cls!r}, "
                                         f"which is not a pstore.Persistent class")
        obj = placeholder(cls, self, oid)
        self._ids.add(obj, oid, persistent=True)
        return obj

    def _activate(self, obj: Persistent) -> None:
        """Load the state of placeholder ``obj`` (called by its first attribute access)."""
        with self._lock:
            self._check_open()
            if status_of(obj) != GHOST:     # another thread loaded it meanwhile
                return
            oid = obj._p_oid
            try:
                if self._load_depth:
                    self._unpickle(oid, None)
                else:
                    self._load_outermost(oid, None)
            except MissingObjectError as error:
                if error.object_id != oid:
                    raise
                raise MissingObjectError(
                    self._path, oid, f"the record of a placeholder of "
                    f"{type(obj).__module__}.{type(obj).__qualname__}, deleted since the "
                    f"placeholder was made (by gc() or another process)") from None

    def _note_changed(self, obj: Persistent) -> None:
        """Called on the first change of ``obj`` since it was written: write it at the next
        commit. On a read-only store the change stays in memory."""
        with self._lock:
            if status_of(obj) == SAVED and not self._closed and not self.read_only:
                set_status(obj, CHANGED)
                self._changed[obj._p_oid] = obj

    def _adopt(self, obj: Persistent) -> int:
        """Make Persistent ``obj``, in no store yet, an object of this one; its record is
        written by the commit under way (or the transaction's). Returns its object id."""
        if obj._p_store is not None:
            raise engine.PicklingError(
                f"a {type(obj).__qualname__} of store {obj._p_store.path!r} cannot be stored "
                f"in {self._path!r}: a Persistent object belongs to one store (store a "
                f"copy.deepcopy of it)")
        oid = self._backend.new_oid()
        self._new_oids.add(oid)
        attach(obj, self, oid)
        self._ids.add(obj, oid, persistent=True)
        return oid

    def _keep(self, oid: int, obj: Any, data: bytes | None) -> None:
        """writeback=True: keep a value read, and its record's bytes to compare at write-back.

        Persistent objects need no cache: they tell the Store when they change.
        """
        if is_tracked(obj) and not isinstance(obj, Persistent):
            self._cache[oid] = obj
            if data is not None:
                self._baseline[oid] = data

    def _after_fork(self) -> None:
        # The parent's lock may have been held by one of its other threads.
        self._lock = threading.RLock()
        if self._closed:
            return
        forked_in_transaction = self._depth > 0
        self._depth = 0
        self._forget_transaction()
        if forked_in_transaction:
            # The parent's write transaction is the parent's: SQLite's in-process lock
            # bookkeeping, copied by fork(), would keep the child from ever writing. The
            # child's copy is closed (the parent's connection is left alone); reopen it.
            self._closed = True
            return
        try:
            self._backend.after_fork()
            # A change marker means something only to the connection that read it.
            self._marker = self._backend.change_marker()
        except Exception:
            # Surface the failure at the child's first call, in the calling thread.
            self._closed = True
            return
        self._invalidate()   # the parent may have committed since it loaded them


def _cycle_among(graph: dict[int, Any]) -> int | None:
    """A node of ``graph`` (node -> the nodes it refers to) on a cycle of it, or None.

    Depth first without recursion; references to nodes outside ``graph`` are ignored.
    """
    done: set[int] = set()
    for root in graph:
        if root in done:
            continue
        on_path = {root}
        path = [(root, iter(graph[root]))]
        while path:
            node, refs = path[-1]
            for ref in refs:
                if ref in on_path:
                    return ref
                if ref in graph and ref not in done:
                    on_path.add(ref)
                    path.append((ref, iter(graph[ref])))
                    break
            else:
                path.pop()
                on_path.discard(node)
                done.add(node)
    return None


class _Items(ItemsView):
    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self._mapping._iter_items()


class _Values(ValuesView):
    def __iter__(self) -> Iterator[Any]:
        return (value for _, value in self._mapping._iter_items())


# Keyed by id(): a Store, being a Mapping, is unhashable.
_open_stores: weakref.WeakValueDictionary[int, Store] = weakref.WeakValueDictionary()


def _reopen(path: str, flag: str, options: dict[str, Any]) -> Store:
    """Unpickle a Store (see :meth:`Store.__reduce__`)."""
    return open(path, flag, **options)


def _reopen_in_child() -> None:
    for store in list(_open_stores.values()):
        store._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reopen_in_child)


def open(path: str | bytes | os.PathLike[str] | os.PathLike[bytes], flag: str = "c", *,
         backend: str | None = None,
         protocol: int = 5, writeback: bool = False,
         lock_timeout: float = DEFAULT_LOCK_TIMEOUT, fsync: bool = False,
         blob_threshold: int | None = DEFAULT_BLOB_THRESHOLD, compression: str | None = None,
         readonly_buffers: bool = False,
         max_record_size: int = DEFAULT_MAX_RECORD_SIZE) -> Store:
    """Open the store at ``path`` and return a :class:`Store`.

    ``flag``: 'r' read-only (writes nothing at all, not even to the file's header),
    'w' read-write on an existing store, 'c' create it if missing (default),
    'n' empty the store (in one transaction, under the write lock; a new one if
    missing). ``path``: str, bytes or os.PathLike. A missing file with 'r' or 'w' raises
    ``FileNotFoundError``; a file that is not a pstore store (or one written by a
    newer pstore) raises :class:`~pstore.errors.FormatError`. New files are
    readable by their owner only.

    ``backend``: ``"sqlite"``, ``"dbm"`` (``"dbm:dbm.dumb"`` names the module),
    ``"postgresql"`` or ``"shelve"`` (read-only, a stdlib shelve file); None
    (default): the one a ``postgresql://`` URL names, else that of the store already
    at ``path``, told from its files, else ``"sqlite"`` (``docs/backends.md``).

    ``protocol``: the pickle protocol records are written with (0 to 5, -1 for 5).
    ``writeback``: keep every value read or assigned and, at :meth:`Store.sync`,
    :meth:`Store.close` and the end of each :meth:`Store.transaction`, write back
    those whose pickle differs from their record's, so in-place mutations persist
    (as in ``shelve``, which rewrites them all).
    ``lock_timeout``: seconds a write waits for another process's write
    transaction before :class:`~pstore.errors.LockTimeoutError`.
    ``fsync``: False (default) -- a commit that returned survives the process being
    killed; True -- it also survives power loss and OS crashes (slower commits).
    Blobs are fsynced before their commit either way.

    Large buffers (``docs/datasets.md``): under protocol 5, every out-of-band buffer
    (``PickleBuffer``: numpy arrays, pandas frames' blocks, ...) of at least
    ``blob_threshold`` bytes (None: never) is stored once per distinct content as a
    blob beside the records, and loaded mapped into memory: copy-on-write (arrays
    come back writable; writes never reach the store) or, with
    ``readonly_buffers=True``, read-only. ``compression``: None (default),
    ``"zlib"``, ``"lzma"`` or ``"zstd"`` (``pip install 'pstore[zstd]'`` before
    Python 3.14), for the records and blobs this Store writes;
    compressed blobs are decompressed into memory instead of mapped. Any store
    reads records and blobs whatever compression wrote them.
    ``max_record_size``: a record whose payload (decompressed) is larger is refused
    with :class:`~pstore.errors.CorruptionError`, before it is decompressed.

    Every record carries a digest checked on every read: damaged bytes raise
    :class:`~pstore.errors.CorruptionError` naming the key or object id.
    """
    if flag not in _FLAGS:
        raise ValueError(f"flag must be one of 'r', 'w', 'c', 'n', not {flag!r}")
    if compression not in blobio.CODECS:
        raise ValueError(f"compression must be None, 'zlib', 'lzma' or 'zstd', not {compression!r}")
    if compression == "zstd":
        blobio.zstd_module()    # MissingModuleError naming what to install, before any write
    if blob_threshold is not None and blob_threshold < 0:
        raise ValueError(f"blob_threshold must be >= 0 or None, not {blob_threshold}")
    if protocol == -1:
        protocol = engine.HIGHEST_PROTOCOL
    if not 0 <= protocol <= engine.HIGHEST_PROTOCOL:
        raise ValueError(f"protocol must be between 0 and {engine.HIGHEST_PROTOCOL}, "
                         f"not {protocol}")
    location = os.fsdecode(path)
    if backend is None:
        backend = detect_backend(location) or "sqlite"
    opened = open_backend(backend, location, flag, lock_timeout=lock_timeout, fsync=fsync)
    try:
        store = Store(opened, protocol=protocol, writeback=writeback,
                      blob_threshold=blob_threshold, compression=compression,
                      readonly_buffers=readonly_buffers, max_record_size=max_record_size)
    except BaseException:
        opened.close()
        raise
    # What another process needs to open the same store the same way (Store.__reduce__):
    # by then it exists, so 'c' and 'n' reopen as 'w' (never emptying it again).
    store.reopen_arguments = (location, "r" if flag == "r" else "w", dict(
        backend=backend, protocol=protocol, writeback=writeback, lock_timeout=lock_timeout,
        fsync=fsync, blob_threshold=blob_threshold, compression=compression,
        readonly_buffers=readonly_buffers, max_record_size=max_record_size))
    return store
