"""Looking at a store's records without loading them: what ``pstore ls``, ``info``,
``show`` and ``globals`` print.

Nothing here unpickles: records are read as bytes, their envelopes decoded and
their pickles disassembled by :mod:`pstore.engine.tools`, which imports nothing
and runs nothing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from .. import engine
from ..backends.base import ReadableBackend
from ..errors import KeyTypeError, MissingObjectError
from . import records
from .renames import Renames
from .verify import load_error

__all__ = ["RecordInfo", "StoreInfo", "describe_record", "describe_items", "raw_record",
           "reachable_ids", "record_bytes", "record_pickles", "store_globals", "store_info"]


@dataclass(frozen=True)
class RecordInfo:
    """What a record holds, read from its bytes: for ``pstore ls``."""

    object_id: int
    #: Bytes of the record as stored (envelope included, blobs not).
    size: int
    #: The type of the record's root object as its pickle names it: ``dict``, ``list``,
    #: ``str``, ... for builtins, ``module.Qualname`` for other classes.
    kind: str
    #: True for the record of a :class:`~pstore.Persistent` object.
    persistent: bool
    #: How many out-of-band buffers the record keeps in blobs, and their bytes.
    blobs: int
    blob_bytes: int


@dataclass(frozen=True)
class StoreInfo:
    """What :meth:`Store.info <pstore.store.Store.info>` reports."""

    path: str
    backend: str
    #: The library underneath (``sqlite3 (SQLite 3.40.1)``, ``dbm.gnu``...).
    module: str
    format_version: int
    keys: int
    records: int
    record_bytes: int
    blobs: int
    blob_bytes: int
    #: The fingerprint (16 hex digits) of the signing key recorded when the store was
    #: created (or first opened for writing by a pstore that signs); None if none was.
    key_fingerprint: str | None = None


def record_pickles(object_id: int, data: bytes) -> tuple[list[bytes], list[records.BlobRef]]:
    """The pickles of record ``object_id`` -- one, or two (class, then state) for a
    Persistent object's -- and the blobs its envelope lists, its digest not checked
    (nothing is loaded). ``pickle.UnpicklingError`` or ``ValueError`` if the bytes are
    not a record."""
    unpacked = records.unpack(data, object_id, digest_required=False, check_digest=False)
    pickle, blobs = unpacked.payload, unpacked.blobs
    pickles = []
    position = 0
    while position < len(pickle):
        end = position + _pickle_length(pickle, position)
        pickles.append(pickle[position:end])
        position = end
    return pickles, blobs


def _pickle_length(data: bytes, start: int) -> int:
    last = None
    for instruction in engine.iter_instructions(memoryview(data)[start:]):
        last = instruction
    assert last is not None     # iter_instructions raises where there is no STOP
    return last.offset + 1


# The builtin type an opcode builds, when the root object is the last thing built.
_BUILDS = {
    "EMPTY_DICT": "dict", "DICT": "dict", "EMPTY_LIST": "list", "LIST": "list",
    "EMPTY_TUPLE": "tuple", "TUPLE": "tuple", "TUPLE1": "tuple", "TUPLE2": "tuple",
    "TUPLE3": "tuple", "EMPTY_SET": "set", "FROZENSET": "frozenset",
    "NONE": "NoneType", "NEWTRUE": "bool", "NEWFALSE": "bool",
    "INT": "int", "BININT": "int", "BININT1": "int", "BININT2": "int", "LONG": "int",
    "LONG1": "int", "LONG4": "int", "FLOAT": "float", "BINFLOAT": "float",
    "UNICODE": "str", "SHORT_BINUNICODE": "str", "BINUNICODE": "str", "BINUNICODE8": "str",
    "STRING": "str", "BINSTRING": "str", "SHORT_BINSTRING": "str",
    "BINBYTES": "bytes", "SHORT_BINBYTES": "bytes", "BINBYTES8": "bytes",
    "BYTEARRAY8": "bytearray", "NEXT_BUFFER": "PickleBuffer",
    "PERSID": "reference", "BINPERSID": "reference",
}
_NOT_BUILDING = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME", "PROTO", "STOP"}
_CALLS = {"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BUILD"}
_FILLS = {"SETITEM", "SETITEMS", "APPEND", "APPENDS", "ADDITEMS"}
# Globals a pickle names on the way to its root's class: None, not the class, or the
# type they build.
_HELPERS: dict[tuple[str, str], str | None] = {
    ("copyreg", "_reconstructor"): None, ("copyreg", "__newobj__"): None,
    ("copyreg", "__newobj_ex__"): None, ("builtins", "getattr"): None,
    ("copy_reg", "_reconstructor"): None, ("__builtin__", "getattr"): None,
    ("_codecs", "encode"): "bytes",     # bytes below protocol 3
    ("numpy.core.multiarray", "_reconstruct"): None,
    ("numpy._core.multiarray", "_reconstruct"): None,
    ("numpy.core.numeric", "_frombuffer"): "numpy.ndarray",
    ("numpy._core.numeric", "_frombuffer"): "numpy.ndarray",
}


def root_kind(pickle: bytes) -> str:
    """The type of the object ``pickle`` builds, told from its opcodes (best effort).

    The root is what the last building opcode before STOP makes: a builtin for the
    opcodes that build one (TUPLE2: ``tuple``), the class a call constructs (REDUCE,
    NEWOBJ, BUILD: the first global that is not a reconstruction helper), or, for a
    container filled after it was made (SETITEMS), the type of what was made first.
    ``"?"`` when it cannot be told.
    """
    first = last = None
    named = None        # the first global naming a class, or the type a helper builds
    strings: list[str] = []     # the operands STACK_GLOBAL takes
    for instruction in engine.iter_instructions(pickle):
        name = instruction.opcode.name
        if name in _NOT_BUILDING:
            continue
        if name != "MARK":
            first = first or name
        last = name
        glob = None
        if name in ("GLOBAL", "INST"):
            glob = instruction.argument
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            glob = (strings[-2], strings[-1])
        elif name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(instruction.argument)
        if glob is not None and named is None:
            module, qualname = glob
            named = _HELPERS.get(glob, qualname if module in ("builtins", "__builtin__")
                                 else f"{module}.{qualname}")
    if last in _CALLS or last in ("GLOBAL", "STACK_GLOBAL"):     # a call, or a class itself
        return named or "?"
    if last in _FILLS:    # filled after it was made: by a builtin opcode, or by a call
        made = first if first in ("EMPTY_DICT", "DICT", "EMPTY_LIST", "LIST", "EMPTY_SET") \
            else None
        return _BUILDS[made] if made else named or "?"
    return _BUILDS.get(last or "", "?")


def describe_record(object_id: int, data: bytes) -> RecordInfo:
    """The :class:`RecordInfo` of record ``object_id`` whose bytes are ``data``."""
    pickles, blobs = record_pickles(object_id, data)
    kind = root_kind(pickles[0]) if pickles else "?"
    return RecordInfo(object_id, len(data), kind, len(pickles) > 1, len(blobs),
                      sum(blob.size for blob in blobs))


def globals_of_record(object_id: int, data: bytes) -> list[tuple[str, str]]:
    """Every (module, name) the pickles of a record would import, each once, nothing run."""
    found: dict[tuple[str, str], None] = {}
    for pickle in record_pickles(object_id, data)[0]:
        found.update(dict.fromkeys(engine.globals_of(pickle)))
    return list(found)


def disassemble_record(object_id: int, data: bytes) -> str:
    """The disassembly of each pickle of a record, and its blob list."""
    pickles, blobs = record_pickles(object_id, data)
    parts = [engine.disassemble(pickle) for pickle in pickles]
    parts += [f"blob {blob.name} ({blob.size} bytes, codec {blob.codec})\n" for blob in blobs]
    return "".join(parts)


def store_info(backend: ReadableBackend, key_fingerprint: str | None) -> StoreInfo:
    """What :meth:`Store.info <pstore.store.Store.info>` returns, from ``backend``'s counts
    and the ``key_fingerprint`` the store records."""
    stats = backend.statistics()
    return StoreInfo(backend.path, backend.name, stats.module, stats.format_version,
                     backend.count_keys(), stats.records, stats.record_bytes, stats.blobs,
                     stats.blob_bytes, key_fingerprint)


def describe_items(path: str, items: Iterable[tuple[str, int, bytes | None]],
                   pattern: str | None, renames: Renames | None = None
                   ) -> Iterator[tuple[str, RecordInfo]]:
    """``(key, RecordInfo)`` of each ``(key, object id, data)`` of store ``path`` whose key
    matches the glob ``pattern`` (all if None), unpickling nothing; with ``renames``, the
    class a record names is given as it will load."""
    for key, oid, data in items:
        if pattern is not None and not fnmatch.fnmatchcase(key, pattern):
            continue
        if data is None:
            raise MissingObjectError(path, oid, f"the record of key {key!r}")
        info = describe_record(oid, data)
        yield key, info if renames is None else replace(info, kind=renames.rename(info.kind))


def reachable_ids(backend: ReadableBackend, keys: str | Iterable[str] | None) -> list[int]:
    """The object ids of every record (``keys`` None), or of those reachable from
    ``keys`` (one key, or several) through their references, lazy ones included."""
    if keys is None:
        return [oid for oid, _, _ in backend.iter_records()]
    todo = []
    for key in [keys] if isinstance(keys, str) else keys:
        if not isinstance(key, str):
            raise KeyTypeError(type(key).__name__)
        oid = backend.get_key(key)
        if oid is None:
            raise KeyError(key)
        todo.append(oid)
    seen: dict[int, None] = {}
    while todo:
        oid = todo.pop()
        if oid not in seen:
            seen[oid] = None
            todo.extend(ref for ref in backend.refs_of(oid) if ref not in seen)
    return list(seen)


def raw_record(backend: ReadableBackend, key: str) -> tuple[int, bytes]:
    """``(object id, stored bytes)`` of the record ``key`` is bound to (``KeyError`` if it
    is bound to none; :class:`MissingObjectError` if its record is gone)."""
    item = backend.get_item(key)
    if item is None:
        raise KeyError(key)
    oid, data = item
    if data is None:
        raise MissingObjectError(backend.path, oid, f"the record of key {key!r}")
    return oid, data


def record_bytes(backend: ReadableBackend, oid: int) -> bytes:
    """The stored bytes of record ``oid``; :class:`MissingObjectError` if it has none."""
    data = backend.get_record(oid)
    if data is None:
        raise MissingObjectError(backend.path, oid)
    return data


def store_globals(backend: ReadableBackend, key: str | None) -> list[str]:
    """What :meth:`Store.globals <pstore.store.Store.globals>` returns: the sorted
    ``module.name`` of every global the records reachable from ``key`` (all, if None)
    name, nothing unpickled."""
    found: set[str] = set()
    pairs = ((oid, data) for oid, data, _ in backend.iter_records()) if key is None \
        else ((oid, record_bytes(backend, oid)) for oid in reachable_ids(backend, key))
    for oid, data in pairs:
        try:
            names = globals_of_record(oid, data)
        except Exception as error:
            raise load_error(error, backend.path, key=key, object_id=oid,
                             is_damage=lambda _: True)
        found.update(f"{module}.{name}" for module, name in names)
    return sorted(found)
