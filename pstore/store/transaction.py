"""The write side of a Store: what a transaction will write, and its commit.

A :class:`Transaction` holds the work of the open write transaction -- values
assigned (pickled only at commit, so that they may refer to one another in
any order), object ids allocated, keys released, Persistent objects bound --
and what waits for the next commit between transactions: Persistent objects
changed since they were written and, with ``writeback=True``, the values read
(:class:`WritebackCache`). At commit it pickles every record, writes the ones
it finds missing on the way, refuses a cycle of eagerly loaded records, deletes
the records nothing refers to any more and commits the backend; at rollback it
undoes in memory what the transaction did.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ..backends.base import Backend, RecordWrite
from ..errors import CorruptionError, IntegrityError, ReferenceCycleError, UnstorableError
from . import blobio, records
from .codec import RecordPickler
from .identity import IdentityMap, is_referable
from .mapped import MappedBlobs
from .persistent import (
    CHANGED,
    SAVED,
    DataManager,
    Persistent,
    attach,
    detach,
    ghostify,
    set_status,
    status_of,
)
from .signing import Signer

__all__ = ["Transaction", "WritebackCache"]

#: Key bindings are sent to the backend once this many are queued (and before a read of
#: keys, and at commit): a server backend then binds them while the next are pickled.
BIND_BATCH = 1000


class WritebackCache:
    """``writeback=True``: the values read or assigned, and their records' bytes as last
    seen, so that a commit writes back only the values whose pickle changed.

    Persistent objects need no cache: they tell the Store when they change.
    """

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}       # oid -> object to write back
        self.baseline: dict[int, bytes] = {}    # oid -> its record as last seen

    def keep(self, oid: int, obj: Any, data: bytes | None) -> None:
        """Keep value ``obj`` of record ``oid``, whose bytes are ``data`` (if known)."""
        if is_referable(obj) and not isinstance(obj, Persistent):
            self.objects[oid] = obj
            if data is not None:
                self.baseline[oid] = data

    def clear(self) -> None:
        self.objects.clear()
        self.baseline.clear()


class Transaction:
    """The pending writes of one Store, and their commit.

    ``manager`` (held weakly) is the Store Persistent objects are attached to;
    ``ids`` its identity map; ``codec`` the compression codec of records and blobs.
    Records are pickled with ``protocol`` and signed by ``signer``; out-of-band
    buffers of at least ``blob_threshold`` bytes become blobs.
    """

    def __init__(self, manager: DataManager, backend: Backend, ids: IdentityMap, *,
                 protocol: int, writeback: bool, blob_threshold: float, codec: int,
                 signer: Signer) -> None:
        self._manager = weakref.ref(manager)
        self.backend = self._backend = backend
        self._path = backend.path
        self._ids = ids
        self._codec = codec
        self._signer = signer
        #: The blobs this Store has mapped (filled by its loader): a buffer that is one of
        #: them is written as a reference to its blob, neither hashed nor copied.
        self.mapped: MappedBlobs[records.BlobRef] = MappedBlobs()
        self._pickler = RecordPickler(protocol, ids.oid_of, self, blob_threshold)
        self.writeback = writeback
        self.depth = 0              # nesting depth of the open transaction (0: none)
        self._flush_cache = False   # whether the open transaction writes the writeback cache
        # The open transaction's work, done at commit:
        self.pending: dict[int, tuple[Any, str | None]] = {}    # oid -> (object, key)
        self._released: set[int] = set()    # oids a key stopped naming
        self._new_oids: set[int] = set()    # oids allocated by the transaction
        self._bound: dict[int, Persistent] = {}     # saved Persistent objects a key was bound to
        self._binds: dict[str, int] = {}    # key -> oid bound, not sent to the backend yet
        # Waiting for the next commit:
        self.cache = WritebackCache()
        self._changed: dict[int, Persistent] = {}   # Persistent objects changed since written

    @property
    def has_unsaved(self) -> bool:
        """Whether a commit would write something besides the transaction's own work."""
        return bool(self.cache.objects or self._changed)

    @contextmanager
    def scope(self, flush_cache: bool, on_begin: Callable[[], None],
              before_commit: Callable[[], None]) -> Iterator[None]:
        """Run the block in the write transaction: begun (then ``on_begin()``) unless one
        is open, which it joins; committed when the outermost block ends normally (after
        ``before_commit()``), else rolled back. ``flush_cache``: the commit also writes
        back the writeback cache."""
        if self.depth:
            self.depth += 1
            self._flush_cache = self._flush_cache or flush_cache
            try:
                yield
            finally:
                self.depth -= 1
            return
        begun = False
        try:
            with self._backend.writing():
                begun = True
                self.depth = 1
                self._flush_cache = flush_cache
                on_begin()
                yield
                before_commit()
                self._write()
        except BaseException:
            if begun:
                self.forget()
            raise
        finally:
            self.depth = 0
        self._committed()

    # -- the work of a transaction --------------------------------------------------------

    def assign(self, key: str, value: Any) -> None:
        """Bind ``key`` to ``value``, written at commit."""
        oid = self._ids.oid_of.get(id(value))
        if isinstance(value, Persistent):
            if oid is None:
                oid = self.adopt(value)
            self._bind(key, oid)
            if oid in self._new_oids:
                self.pending[oid] = (value, key)
            else:
                # Its record is up to date, or it is in _changed and written anyway.
                self._bound[oid] = value
            return
        if oid is None:
            oid = self._backend.new_oid()
            self._new_oids.add(oid)
        if is_referable(value):
            current = self._ids.get(oid)
            if current is not None and current is not value:
                # Two objects for one record (the held one predates another process's
                # commit): loaded objects may contain the other one, so reload them all.
                self._ids.forget_loads()
            self._ids.add(value, oid)
            if self.writeback:
                self.cache.objects[oid] = value
        self._bind(key, oid)
        self.pending[oid] = (value, key)

    def _bind(self, key: str, oid: int) -> None:
        # Queued, and sent to the backend together (see flush_binds).
        old = self._binds.get(key)
        if old is not None and old != oid:
            self._released.add(old)
        self._binds[key] = oid
        if len(self._binds) >= BIND_BATCH:
            self.flush_binds()

    def flush_binds(self) -> None:
        """Send the keys bound since the last call to the backend: before the transaction
        reads keys (so that it sees them) and at its commit."""
        if self._binds:
            # Dropped only once sent: after a failure they are sent again by the next read
            # or the commit (which then fails and rolls back), never forgotten.
            self._released.update(self._backend.bind_keys(list(self._binds.items())))
            self._binds.clear()

    def unbind(self, key: str) -> bool:
        """Unbind ``key`` (its record is deleted at commit if nothing refers to it);
        False if it was not bound."""
        self.flush_binds()
        oid = self._backend.unbind_key(key)
        if oid is None:
            return False
        self._released.add(oid)
        return True

    def collect_garbage(self) -> int:
        """Delete, in this transaction, the records no key reaches; return how many."""
        self.flush_binds()
        return self._backend.gc()

    def adopt(self, obj: Persistent) -> int:
        """Make Persistent ``obj``, in no store yet, an object of this one; its record is
        written by the commit under way (or the transaction's). Returns its object id."""
        manager = self._manager()
        assert manager is not None, "a commit runs only while its Store is alive"
        if obj._p_store is not None:
            raise UnstorableError(
                self._path, f"a {type(obj).__qualname__} of store {obj._p_store.path!r}",
                "a Persistent object belongs to one store (store a copy.deepcopy of it)")
        oid = self._backend.new_oid()
        self._new_oids.add(oid)
        attach(obj, manager, oid)
        self._ids.add(obj, oid, persistent=True)
        return oid

    def write_blob(self, raw: memoryview) -> records.BlobRef:
        """Store out-of-band buffer ``raw`` as a blob of this transaction; a buffer that is
        a blob this Store maps (a re-store) is a reference to that blob, if it is still
        there (asked under the write lock: no gc can remove it before the commit)."""
        mapped = self.mapped.find(raw)
        if mapped is not None and self._backend.has_blob(mapped.name, mapped.size):
            return mapped
        return blobio.write_blob(self._backend, raw, self._codec)

    def sign(self, oids: Iterable[int], max_record_size: int) -> int:
        """Sign anew with this Store's key the records ``oids`` not signed by it (``Store.trust``),
        each record's digest checked first; return how many were signed. In a scope."""
        from .inspection import record_bytes

        backend, signed = self._backend, 0
        for oid in oids:
            if oid in self.pending:     # written at the commit, signed by this Store's key
                continue
            data = record_bytes(backend, oid)
            try:
                unpacked = records.unpack(data, oid, signer=self._signer,
                                          digest_required=oid >= backend.digests_from,
                                          max_size=max_record_size)
                if unpacked.signed:
                    continue
                new = records.resign(data, oid, unpacked, self._signer)
            except records.IntegrityMismatch as error:
                raise IntegrityError(self._path, str(error), object_id=oid) from error
            except ValueError as error:
                raise CorruptionError(self._path, str(error), object_id=oid) from None
            refs = backend.refs_of(oid)
            eager = set(backend.refs_of(oid, lazy=False))
            backend.put_record(oid, new, refs, lazy_refs=[ref for ref in refs if ref not in eager],
                               blobs=[blob.name for blob in unpacked.blobs])
            signed += 1
        return signed

    def note_changed(self, obj: Persistent) -> None:
        """Persistent ``obj`` changed since it was written: write it at the next commit."""
        if status_of(obj) == SAVED:
            set_status(obj, CHANGED)
            self._changed[obj._p_oid] = obj

    def discard_unsaved(self) -> None:
        """Forget the writeback cache and the changes of Persistent objects, unwritten."""
        self.cache.clear()
        self._changed.clear()

    # -- commit -----------------------------------------------------------------------------

    def _write(self) -> None:
        """Write every record of the transaction, and what else waits for a commit."""
        self.flush_binds()
        self._pickler.prepare()
        pending = self.pending
        for oid, obj in self._changed.items():
            pending.setdefault(oid, (obj, None))
        cache = self.cache
        write_back: set[int] = set()    # cached objects written only if they changed
        if self._flush_cache:
            for oid, obj in cache.objects.items():
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
            writes: list[RecordWrite] = []    # sent to the backend together, once pickled
            for oid, (obj, key) in batch:
                data, refs, blobs = self._pickle(obj, key, oid)
                written.add(oid)
                if oid in write_back and cache.baseline.get(oid) == data:
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
                writes.append(RecordWrite(oid, data, refs, lazy,
                                          [blob.name for blob in blobs] if blobs else ()))
                if oid in cache.objects:
                    cache.baseline[oid] = data
            if writes:
                self._backend.put_records(writes)
            if not referenced:
                break
            # A referenced object whose record is gone (deleted by gc() or by releasing
            # its last key, here or in another process) is written again from memory;
            # so is a Persistent object first met while pickling (its object id is new).
            unwritten = referenced.keys() - written
            new = unwritten & self._new_oids
            old = unwritten - new
            missing = new | (old - self._backend.existing(old))
            batch = [(oid, (referenced[oid], None)) for oid in missing]
        cyclic = self._closes_a_cycle(eager) if eager else None
        if cyclic is not None:
            raise ReferenceCycleError(self._path, self._describe(cyclic))
        for oid in self._released:
            if not self._backend.is_referenced(oid):
                self._backend.delete_record(oid)

    def _committed(self) -> None:
        self._changed.clear()
        if self._flush_cache:
            self.cache.clear()
        self._end()

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
            reason = (f"{error.what} in it: {error.reason}"
                      if isinstance(error, UnstorableError) else str(error))
            raise UnstorableError(self._path, what, reason) from error
        return records.pack(oid, pickle, blobs, self._codec, self._signer), refs, blobs

    def _describe(self, oid: int) -> str:
        entry = self.pending.get(oid)
        if entry is not None and entry[1] is not None:
            return f"the value of key {entry[1]!r}"
        return f"object id {oid}"

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

    # -- rollback ---------------------------------------------------------------------------

    def rollback(self) -> None:
        """Roll the open transaction back, in the backend and in memory."""
        try:
            self._backend.rollback()
        finally:
            self.forget()

    def forget(self) -> None:
        """Undo in memory what the open transaction did: forget the objects it stored first,
        and make the records it rewrote load again.

        Persistent objects it stored first become objects of no store again (with the
        state they have); those with uncommitted changes become placeholders, so
        they load their committed state when next used. Afterwards no transaction is open.
        """
        self.depth = 0
        manager = self._manager()
        for oid in self._new_oids:
            obj = self._ids.get(oid)
            if isinstance(obj, Persistent):
                detach(obj)
        for obj in self._changed.values():
            if obj._p_store is manager:
                ghostify(obj)
        self._changed.clear()
        self._ids.remove_oids(self._new_oids)
        self._ids.forget_loads(self.pending)
        if self._flush_cache:
            self.cache.clear()
        self._end()

    def _end(self) -> None:
        self.pending.clear()
        self._binds.clear()
        self._bound.clear()
        self._released.clear()
        self._new_oids.clear()
        self._flush_cache = False
        self._ids.maybe_sweep()


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
