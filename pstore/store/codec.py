"""The record codec: objects to record pickles and back, with references between records.

Three pieces, the one place that knows how a record's pickle refers to other records:

* :class:`RecordPickler` writes a record. Every object already in the store
  (but the record's root) becomes a *persistent id*: its object id, or
  ``(object id, class)`` for a Persistent object -- under protocol 0, the text
  ``"oid module qualname"`` -- so that a placeholder of the right class can be
  made without reading its record.
* :class:`RecordUnpickler` reads a record and hands each persistent id, parsed
  back into ``(object id, class or None)``, to a :class:`Resolver`.
* :class:`RecordLoader` is the Store's resolver: it loads referenced records
  through the identity map, by recursion bounded so that a chain of records of
  any length loads, and fills placeholders. It keeps the class caches that
  spare a Persistent record's class pickle from being read twice.
"""

from __future__ import annotations

import io
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

from .. import engine
from ..backends.base import Backend, ReadableBackend
from ..errors import (
    CorruptionError,
    IntegrityError,
    MissingClassError,
    MissingObjectError,
    UntrustedError,
)
from . import blobio, records, tensors
from .identity import IdentityMap, is_referable
from .mapped import MappedBlobs
from .persistent import GHOST, DataManager, Persistent, fill, is_ghost, placeholder, status_of
from .renames import Renames
from .signing import Signer
from .verify import load_error

__all__ = ["RecordPickler", "PicklerHost", "RecordUnpickler", "ReferenceLoading",
           "Resolver", "RecordLoader", "LOAD_DEPTH_LIMIT"]

#: How deep loads of referenced records may nest before the chain is loaded from its far end.
LOAD_DEPTH_LIMIT = 50


class PicklerHost(Protocol):
    """What :class:`RecordPickler` asks of the transaction it writes records for."""

    def adopt(self, obj: Persistent) -> int:
        """Make Persistent ``obj``, in no store yet, an object of the store; its new object id."""

    def write_blob(self, raw: memoryview) -> records.BlobRef:
        """Store out-of-band buffer ``raw`` as a blob (streamed, not copied)."""


class RecordPickler(engine.Pickler):
    """Pickles the records of one Store, one at a time.

    Objects of ``oid_of`` (``id(obj) -> object id``), except the record's root,
    become references. A Persistent object not yet in the store is given to
    ``host.adopt``, which returns its new object id. Under protocol 5, each
    out-of-band buffer (``PickleBuffer``) of at least ``blob_threshold`` bytes goes
    to ``host.write_blob`` as it is met, so a large array is streamed to its blob
    and never copied into the pickle. One instance serves every record, so that
    the engine prepares its dump once. ``host`` is held weakly.
    """

    def __init__(self, protocol: int, oid_of: dict[int, int], host: PicklerHost,
                 blob_threshold: float) -> None:
        super().__init__(io.BytesIO(), protocol,    # unwritten: records are made by _dump
                         buffer_callback=self._out_of_band if protocol >= 5 else None)
        self._oid_of = oid_of.get
        # A plain container whose id is not in the identity map is not a record: the engine
        # (in C) takes persistent_id's answer to be None without calling it.
        self.persistent_id_for_ids = oid_of
        self._host = weakref.proxy(host)
        self._blob_threshold = blob_threshold
        self._root: Any = None
        self._refs: dict[int, Any] = {}
        self._blobs: list[records.BlobRef] = []
        self._class_pickles: dict[type, bytes] = {}     # the first pickle of a Persistent record
        self._tensors: tensors.TensorReducer | None = None  # once torch is imported
        self.prepare()

    # Atoms are never in the identity map, nor Persistent: no need to ask about them.
    persistent_id_for_atoms = False

    def persistent_id(self, obj: Any) -> Any:
        # Called for every object pickled but atoms: one dict lookup and one type check.
        oid = self._oid_of(id(obj))
        if oid is None:
            if not isinstance(obj, Persistent):
                return None
            oid = self._host.adopt(obj)
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
        self._blobs.append(self._host.write_blob(raw))
        return False

    def prepare(self) -> None:
        """Take the engine's hooks and accelerator as they are now for the records pickled
        from now on: called at the start of each commit, so that a record does not pay
        for reading them."""
        self._dump = self.bytes_dumper()

    def pickle(self, root: Any) -> tuple[bytes, dict[int, Any], list[records.BlobRef]]:
        """The pickle of ``root``, {object id: object} of every reference written, and
        the blobs of its out-of-band buffers, in order."""
        self._root = root
        refs: dict[int, Any] = {}
        blobs: list[records.BlobRef] = []
        self._refs, self._blobs = refs, blobs
        try:
            return self._pickled(root), refs, blobs
        finally:
            self._root = None
            self.clear_memo()   # the memo holds the record's objects alive

    def _pickled(self, value: Any) -> bytes:
        """The pickle of ``value``, with torch tensors out of band while torch is imported."""
        if self._tensors is None:
            torch = tensors.torch_if_imported()
            if torch is None:
                return self._dump(value)
            self._tensors = tensors.TensorReducer(torch)
            self.reducer_override = self._tensors.reduce
            self.prepare()
        try:
            return self._dump(value)
        finally:
            self._tensors.clear()

    def pickle_persistent(self, obj: Persistent
                          ) -> tuple[bytes, dict[int, Any], list[records.BlobRef]]:
        """The record of Persistent ``obj`` -- a pickle of its class, then one of its
        state -- {object id: object} of every reference written, and the blobs of the
        state's out-of-band buffers, in order."""
        refs: dict[int, Any] = {}
        blobs: list[records.BlobRef] = []
        self._refs, self._blobs = refs, blobs
        cls = type(obj)
        try:
            # A class pickles to the same bytes every time: pickled once per class.
            head = self._class_pickles.get(cls)
            if head is None:
                head = self._class_pickles[cls] = self._dump(cls)
                self.clear_memo()
            return head + self._pickled(obj.__getstate__()), refs, blobs
        finally:
            self.clear_memo()


class Resolver(Protocol):
    """What :class:`RecordUnpickler` asks to turn a reference into an object."""

    def resolve(self, oid: int, cls: Any) -> Any:
        """The object a record's reference to ``oid`` stands for; ``cls`` is the class
        the reference names (a Persistent object's), or None for a plain record."""


class ReferenceLoading:
    """The persistent ids of records, parsed and handed to a resolver: what both record
    unpicklers share (the restricted one is in :mod:`.untrusted`, imported at the first
    record not signed by the Store's key). Only pstore's own forms are accepted. Every
    global a record names is looked up under ``renames`` first; one that cannot be
    imported raises :class:`~pstore.errors.MissingClassError` (of store ``path``)."""

    _resolver: Resolver
    _path: str
    _renames: Renames | None

    def find_class(self, module: str, name: str) -> Any:
        new_module, new_name = (module, name) if self._renames is None else \
            self._renames.apply(module, name)
        try:
            return super().find_class(new_module, new_name)  # type: ignore[misc]
        except (ImportError, AttributeError) as error:
            renamed = (new_module, new_name) != (module, name)
            raise MissingClassError(self._path, f"{module}.{name}", str(error),
                                    renamed_to=f"{new_module}.{new_name}" if renamed
                                    else None) from error

    def persistent_load(self, pid: Any) -> Any:
        kind = type(pid)
        if kind is int:
            return self._resolver.resolve(pid, None)
        if kind is tuple and len(pid) == 2 and type(pid[0]) is int:
            return self._resolver.resolve(pid[0], self._reference_class(pid[1]))
        if kind is str:     # protocol 0 writes persistent ids as text
            oid, _, cls = pid.partition(" ")
            if oid.isdigit():
                if not cls:
                    return self._resolver.resolve(int(oid), None)
                module, _, qualname = cls.partition(" ")
                return self._resolver.resolve(int(oid), self._named_class(module, qualname))
        raise engine.UnpicklingError(f"a record refers to {pid!r}, which is not an object id")

    def _reference_class(self, cls: Any) -> Any:
        """The class a binary reference names (``cls``, already resolved by the pickle)."""
        return cls

    def _named_class(self, module: str, qualname: str) -> Any:
        """The class a protocol 0 reference names as text."""
        head, *attributes = qualname.split(".")
        found = self.find_class(module, head)
        for attribute in attributes:
            found = getattr(found, attribute)
        return found


class RecordUnpickler(ReferenceLoading, engine.Unpickler):
    """Unpickles the records of one Store, handing every reference to ``resolver``
    (held weakly) as ``(object id, class or None)``: with full pickle semantics, for
    records signed by the Store's key.

    One instance serves every record, nested loads of referenced records included
    (``load_bytes_at`` keeps each pickle's state apart), so a record costs no setup.
    """

    def __init__(self, resolver: Resolver, path: str = "",
                 renames: Renames | None = None) -> None:
        super().__init__(io.BytesIO())   # records are read with load_bytes_at, never from the file
        # A proxy: the resolver holds this unpickler, and a cycle would keep a dropped
        # resolver (and the backend it reads) alive until the garbage collector runs.
        self._resolver = weakref.proxy(resolver)
        self._path = path
        self._renames = renames


class _LoadFirst(Exception):
    """Internal: abandon this nested load; the outermost load loads ``oid`` first."""

    def __init__(self, oid: int) -> None:
        super().__init__(oid)
        self.oid = oid


class RecordLoader:
    """Loads the records of one store into objects, one object per object id: the
    :class:`Resolver` of its :class:`RecordUnpickler`.

    ``manager`` is the data manager placeholders are made for (held weakly);
    ``pending`` the open transaction's ``object id -> (object, key)`` of values
    not yet written (they load as themselves); ``writable_buffers`` whether blobs
    load as writable (copy-on-write) buffers; a record whose payload is larger than
    ``max_record_size`` is refused before it is decompressed; ``renames`` maps the names
    of globals records name (:class:`RecordUnpickler`). Every error met while
    loading a record is translated here, once (:func:`~pstore.store.verify.load_error`):
    damage becomes :class:`~pstore.errors.CorruptionError` naming the object id.

    Each record is loaded by its own signature (docs/safety.md): signed by ``signer``'s
    key, with full pickle semantics; else restricted (``allow`` adds names to the
    data policy), a refusal raising :class:`~pstore.errors.UntrustedError`. A record's
    references load by their own signatures. A record whose digest or MAC fails
    raises :class:`~pstore.errors.IntegrityError`.
    """

    def __init__(self, manager: DataManager, backend: ReadableBackend, ids: IdentityMap,
                 pending: Mapping[int, tuple[Any, str | None]], *, writable_buffers: bool,
                 max_record_size: int, mapped: MappedBlobs[records.BlobRef], signer: Signer,
                 allow: str | Iterable[str] = (), renames: Renames | None = None) -> None:
        self._manager = weakref.ref(manager)
        self._backend = backend
        self._path = backend.path
        self._ids = ids
        self._pending = pending
        self._writable_buffers = writable_buffers
        self._max_record_size = max_record_size
        self._signer = signer
        self._open_common = records.common_opener(signer)
        self._mapped = mapped
        self._renames = renames
        self._unpickler = RecordUnpickler(self, self._path, renames)
        self._allow = allow
        # The unpickler of records not signed by the Store's key, made at the first one.
        self._restricted: Any = None
        self._restrict_all = False  # while True (restricting), signed records load restricted
        self._depth = 0             # how many record loads are nested right now
        # Called (once) before the load under way resolves its first reference: see load_fresh.
        self._before_reference: Callable[[], None] | None = None
        self._classes: dict[bytes, type[Persistent]] = {}   # first pickle of a record -> class
        #: Whether the store was made with this Store's key (set by the Store): then a
        #: record that cannot be unpacked is an IntegrityError, not plain damage.
        self.own_store = False

    @contextmanager
    def restricting(self, allow: str | Iterable[str] = ()) -> Iterator[None]:
        """Within the block every record loads restricted, signed or not, with ``allow``
        added to the names the Store allows."""
        saved = self._restricted, self._restrict_all
        if allow:
            mine = self._allow
            combined: str | list[str] = "*" if "*" in (mine, allow) else [
                *([] if isinstance(mine, str) else mine),
                *([] if isinstance(allow, str) else allow)]
            self._restricted = self._new_restricted(combined)
        self._restrict_all = True
        try:
            yield
        finally:
            self._restricted, self._restrict_all = saved

    def _new_restricted(self, allow: str | Iterable[str]) -> Any:
        from .untrusted import RestrictedRecordUnpickler

        return RestrictedRecordUnpickler(self, allow, self._path, self._renames)

    def load(self, oid: int, data: bytes | None = None) -> Any:
        """The object of record ``oid``; ``data``, if given, is the record's (already read).

        A record's references are loaded while it is unpickled, by recursion. So that
        a chain of records of any length loads, a load nested more than
        :data:`LOAD_DEPTH_LIMIT` deep is abandoned (nothing of it was registered yet)
        and the outermost load first loads the record it needed, then tries again:
        chains load from their far end, a bounded stretch at a time.
        """
        entry = self._pending.get(oid)
        if entry is not None:
            return entry[0]
        obj = self._ids.get(oid)
        if obj is not None and (data is None or not is_ghost(obj)):
            return obj
        if self._depth >= LOAD_DEPTH_LIMIT:
            raise _LoadFirst(oid)
        if self._depth:
            return self._unpickle(oid, None)
        return self._load_outermost(oid, data)

    def load_fresh(self, oid: int, data: bytes | None,
                   before_reference: Callable[[], None]) -> Any:
        """:meth:`load`, calling ``before_reference()`` before the first reference the
        record holds is resolved (not at all if it holds none): the Store brings its
        identity map up to date there, so a record that refers to nothing costs no query."""
        self._before_reference = before_reference
        try:
            return self.load(oid, data)
        finally:
            self._before_reference = None

    def resolve(self, oid: int, cls: Any) -> Any:
        """The object of a reference (see :class:`Resolver`): the record loaded, or for a
        Persistent object the loaded object or a new placeholder (its record is not read)."""
        before_reference = self._before_reference
        if before_reference is not None:
            self._before_reference = None
            before_reference()
        if cls is None:
            return self.load(oid)
        obj = self._ids.get(oid)
        if obj is not None:
            return obj
        if not (isinstance(cls, type) and issubclass(cls, Persistent)):
            raise engine.UnpicklingError(f"a record refers to object id {oid} as a {cls!r}, "
                                         f"which is not a pstore.Persistent class")
        return self._new_placeholder(cls, oid)

    def fill_placeholder(self, obj: Persistent) -> None:
        """Load the state of placeholder ``obj`` from its record."""
        oid = obj._p_oid
        try:
            if self._depth:
                self._unpickle(oid, None)
            else:
                self._load_outermost(oid, None)
        except MissingObjectError as error:
            if error.object_id != oid:
                raise
            if self._still_referenced(oid):
                raise CorruptionError(self._path, "its record is missing, though records "
                                      "refer to it", object_id=oid) from error
            raise MissingObjectError(
                self._path, oid, f"the record of a placeholder of "
                f"{type(obj).__module__}.{type(obj).__qualname__}, deleted since the "
                f"placeholder was made (by gc() or another process)") from None

    def _still_referenced(self, oid: int) -> bool:
        """Whether a record refers to ``oid`` (then its missing record is damage, not a
        deletion by gc() or another process); False where the backend cannot tell."""
        backend = self._backend
        if not isinstance(backend, Backend):
            return False
        try:
            return backend.is_referenced(oid)
        except Exception as error:
            raise load_error(error, self._path, object_id=oid, is_damage=backend.is_damage)

    def _load_outermost(self, oid: int, data: bytes | None) -> Any:
        """Load record ``oid`` (or fill its placeholder) as the outermost load: when a
        nested load goes too deep, load the record it needed first, then try again."""
        try:
            return self._unpickle(oid, data)    # nearly always: no chain too long
        except _LoadFirst as deeper:
            needed: int | None = deeper.oid
        wanted = [oid]      # records to load, the last one first
        held = []           # what was loaded, alive until the whole load is done
        while True:
            if needed is not None:
                if needed in wanted:
                    raise CorruptionError(self._path, "its records refer to one another in "
                                          "a cycle", object_id=needed)
                wanted.append(needed)
            current = wanted[-1]
            try:
                obj = self._unpickle(current, data if current == oid else None)
            except _LoadFirst as deeper:
                needed = deeper.oid
                continue
            needed = None
            if len(wanted) == 1:
                return obj
            held.append(obj)
            wanted.pop()

    def _unpickle(self, oid: int, data: bytes | None) -> Any:
        """Unpickle record ``oid`` (reading it unless ``data`` is given) and register it."""
        opened = None
        if data is not None and self._open_common is not None:
            opened = self._open_common(data, oid)     # the common record, in one C call
        if opened is not None:
            data, signed = opened
            buffers, verified = None, True
        else:
            data, buffers, verified, signed = self._unwrap(oid, data)
        trusted = signed and not self._restrict_all
        if trusted:
            unpickler = self._unpickler
        else:
            if self._restricted is None:
                self._restricted = self._new_restricted(self._allow)
            unpickler = self._restricted
        self._depth += 1
        try:
            # The class cache is of trusted loads: a restricted load checks its class itself.
            known = self._known_class(data) if trusted and self._classes else None
            if known is None:
                obj, end = unpickler.load_bytes_at(data, 0, buffers)
            else:
                obj, end = known
            if end < len(data):     # a Persistent object's record: class, then state
                return self._load_state(oid, obj, data, end, buffers, unpickler, trusted)
        except _LoadFirst:
            raise
        except engine.RestrictedUnpicklingError as error:
            # Raised only by the restricted unpickler, for this record (a nested record's
            # refusal is an UntrustedError already).
            name = error.global_name
            reason = error.reason if name is None else f"{name}: {error.reason}"
            if error.opcode is not None:
                reason += f" ({error.opcode} at offset {error.offset})"
            raise UntrustedError(self._path, reason, object_id=oid, global_name=name) from None
        except Exception as error:
            raise load_error(error, self._path, object_id=oid, decoded=verified,
                             is_damage=self._backend.is_damage)
        finally:
            self._depth -= 1
        if is_referable(obj):
            self._ids.add(obj, oid)
        return obj

    def _unwrap(self, oid: int, data: bytes | None
                ) -> tuple[bytes, list[Any] | None, bool, bool]:
        """The payload of record ``oid`` (reading it unless ``data`` is given), checked, its
        out-of-band buffers (or None), whether a digest or MAC verified it, and whether it
        is signed by this Store's key."""
        backend = self._backend
        try:
            if data is None:
                data = backend.get_record(oid)
            if data is None:
                raise MissingObjectError(self._path, oid)
            try:
                payload, blobs, verified, signed = records.unpack(
                    data, oid, signer=self._signer, digest_required=oid >= backend.digests_from,
                    max_size=self._max_record_size)
            except ValueError as error:
                if self.own_store or isinstance(error, records.IntegrityMismatch):
                    raise IntegrityError(self._path, str(error), object_id=oid) from error
                raise
            buffers = [self._read_blob(blob) for blob in blobs] if blobs else None
        except Exception as error:
            raise load_error(error, self._path, object_id=oid, is_damage=backend.is_damage)
        return payload, buffers, verified, signed

    def _read_blob(self, blob: records.BlobRef) -> Any:
        buffer = blobio.read_blob(self._backend, blob, self._writable_buffers)
        if not blob.codec:
            self._mapped.add(buffer, blob)
        return buffer

    def _known_class(self, data: bytes) -> tuple[type[Persistent], int] | None:
        """The class of a Persistent object's record ``data`` whose first pickle was read
        before, and where that pickle ends; or None."""
        for head, cls in self._classes.items():
            # A pickle ends where its STOP is: data that starts with a whole pickle has
            # it as its first pickle.
            if data.startswith(head) and len(data) > len(head):
                return cls, len(head)
        return None

    def _load_state(self, oid: int, cls: Any, data: bytes, start: int,
                    buffers: list[Any] | None, unpickler: engine.Unpickler,
                    trusted: bool) -> Persistent:
        """Load the state of Persistent record ``oid`` into its object (its placeholder, or
        a new object of ``cls``): the pickle at ``start`` of ``data``, whose first pickle
        is that of ``cls``, by ``unpickler``; ``buffers`` are the state's out-of-band
        buffers; ``trusted``: whether the record is signed by this Store's key."""
        if not (isinstance(cls, type) and issubclass(cls, Persistent)):
            raise CorruptionError(self._path, f"the record holds two pickles, but the first "
                                  f"is {cls!r}, not a pstore.Persistent class", object_id=oid)
        if trusted:
            # Unpickling the class once per Store is enough: find_class resolved it.
            self._classes[data[:start]] = cls
        obj = self._ids.get(oid)
        if obj is None:
            # In the map before its state loads: the state may refer to the object itself.
            obj = self._new_placeholder(cls, oid)
        elif status_of(obj) != GHOST:
            return obj
        fill(obj, lambda: unpickler.load_bytes_at(data, start, buffers)[0])
        return obj

    def _new_placeholder(self, cls: type[Persistent], oid: int) -> Persistent:
        manager = self._manager()
        assert manager is not None, "a load runs only while its Store is alive"
        obj = placeholder(cls, manager, oid)
        self._ids.add(obj, oid, persistent=True)
        return obj
