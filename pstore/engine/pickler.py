"""The pickler: Python objects to pickle bytes, protocols 0 to 5.

For every protocol, :func:`dumps` writes the same bytes as the running CPython's
``pickle.dumps``. Byte identity is a matter of taking the same decisions in the
same order, so the order of the checks in ``save`` is part of the contract:

1. at every object, close the current frame if it is full (protocol 4+);
2. ``persistent_id`` (when the pickler has one) wins over everything else;
3. atoms (None, bool, int, float) are written directly and never memoized;
4. an object already in the memo is written as a memo reference;
5. exact builtin containers and strings have their own opcodes -- so
   ``reducer_override`` is never consulted for them;
6. then ``reducer_override``; then classes and functions by name; then the
   reduce protocol (``dispatch_table``, ``copyreg.dispatch_table``,
   ``__reduce_ex__``, ``__reduce__``).

All the work of a ``dump`` happens in closures made by :func:`_make_dump`: they
keep the output buffer, the memo and the pickler's hooks in local variables,
because attribute lookups on ``self`` in the per-object path are what makes a
pure-Python pickler slow. A pickler keeps its closures from one dump to the
next while its hooks stay the same, so dumping many small objects with one
pickler (as the store does) pays for building them once.

The C fast path (``_pickler_speedups.c``, chosen by :func:`pstore.engine.use_accelerators`)
takes the place of ``save``/``save_each`` for protocols 1 to 5 outside fast mode: it writes
the plain data (exact None, bool, int, float, str, bytes, bytearray, dict, list, tuple) into
the same frame buffer with the same memo, and hands every other object back to the Python
``save_each`` one at a time, resuming after it, so hooks and errors have one implementation.
"""

from __future__ import annotations

import codecs
import copyreg
import pickle as _stdlib_pickle  # PicklingError and PickleBuffer only
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from functools import partial as _partial
from itertools import chain, islice
from types import FunctionType
from typing import Any

from .opcodes import (  # the opcodes, as constants read from the one table
    ADDITEMS,
    APPEND,
    APPENDS,
    BATCH_SIZE,
    BINBYTES,
    BINBYTES8,
    BINFLOAT,
    BINGET,
    BININT,
    BININT1,
    BININT2,
    BINPERSID,
    BINPUT,
    BINUNICODE,
    BINUNICODE8,
    BUILD,
    BYTEARRAY8,
    DEFAULT_PROTOCOL,
    DICT,
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_SET,
    EMPTY_TUPLE,
    EXT1,
    EXT2,
    EXT4,
    FLOAT,
    FRAME,
    FRAME_SIZE_MIN,
    FRAME_SIZE_TARGET,
    FROZENSET,
    GLOBAL,
    HIGHEST_PROTOCOL,
    LIST,
    LONG1,
    LONG4,
    LONG_BINGET,
    LONG_BINPUT,
    MARK,
    MEMOIZE,
    NEWFALSE,
    NEWOBJ,
    NEWOBJ_EX,
    NEWTRUE,
    NEXT_BUFFER,
    NONE,
    PERSID,
    POP,
    POP_MARK,
    PROTO,
    READONLY_BUFFER,
    REDUCE,
    SETITEM,
    SETITEMS,
    SHORT_BINBYTES,
    SHORT_BINUNICODE,
    STACK_GLOBAL,
    STOP,
    TUPLE,
    TUPLE1,
    TUPLE2,
    TUPLE3,
    UNICODE,
    python2_name,
)

PicklingError = _stdlib_pickle.PicklingError
PickleBuffer = _stdlib_pickle.PickleBuffer

__all__ = ["Pickler", "dump", "dumps"]

_pack_uint2 = struct.Struct("<H").pack
_pack_int4 = struct.Struct("<i").pack
_pack_uint4 = struct.Struct("<I").pack
_pack_uint8 = struct.Struct("<Q").pack
_pack_double = struct.Struct(">d").pack

# Ready-made opcode+argument strings for the most frequent small arguments.
_BININT1 = [BININT1 + bytes([i]) for i in range(256)]
_SHORT_BINUNICODE = [SHORT_BINUNICODE + bytes([i]) for i in range(256)]
_SHORT_BINBYTES = [SHORT_BINBYTES + bytes([i]) for i in range(256)]
_BINPUT = [BINPUT + bytes([i]) for i in range(256)]
_BINGET = [BINGET + bytes([i]) for i in range(256)]
_TUPLE_OF_SIZE = {1: TUPLE1, 2: TUPLE2, 3: TUPLE3}
#: What a pickler with ``persistent_id_for_atoms = False`` asks no persistent id for.
_ATOMS = frozenset({str, int, float, bool, type(None)})
#: What ``persistent_id_for_ids`` covers: a persistent id is asked for one of these only if
#: its id is a key of that dict.
_PLAIN_CONTAINERS = frozenset({dict, list, tuple, set, frozenset, bytes, bytearray})

#: The C half of the pickler (pstore/engine/_pickler_speedups.c) or None: set by
#: :func:`pstore.engine.use_accelerators`, the one place that picks the implementation.
_accelerator: Any = None


def _memo_type() -> type:
    """The kind of memo the current implementation uses: C's ``Memo``, or a dict."""
    return dict if _accelerator is None else _accelerator.Memo

# The types of the three singletons whose classes protocol 2+ pickles as type(singleton).
_SINGLETON_TYPES = {type(None): None, type(...): ..., type(NotImplemented): NotImplemented}

# Below protocol 4, a global with a dotted qualified name ("Outer.Inner") cannot be one GLOBAL.
# CPython 3.13 writes getattr(getattr(Outer, "Inner"), ...) from the top-level name; earlier
# versions write getattr(parent, last name), the parent saved as any other object.
_DOTTED_NAME_AS_GETATTR_CHAIN = sys.version_info >= (3, 13)


def _int_to_long_bytes(value: int) -> bytes:
    """Two's complement little-endian bytes of ``value`` as LONG1/LONG4 carry it (0 is b"")."""
    if value == 0:
        return b""
    # One byte more than the magnitude needs leaves room for the sign bit; a negative
    # number whose top byte is then only sign is one byte shorter (e.g. -128 is b"\x80").
    size = (value.bit_length() >> 3) + 1
    data = value.to_bytes(size, "little", signed=True)
    if value < 0 and size > 1 and data[-1] == 0xFF and data[-2] & 0x80:
        data = data[:-1]
    return data


def _sized_header(size: int, short: list[bytes] | None, opcode4: bytes, opcode8: bytes,
                  framing: bool, what: str) -> bytes:
    """The opcode and length prefix of a str or bytes argument of ``size`` bytes: the
    1-byte-length opcode from ``short`` if there is one, else 4-byte, else (protocol 4+)
    8-byte lengths."""
    if short is not None and size < 256:
        return short[size]
    if size <= 0xFFFFFFFF:
        return opcode4 + _pack_uint4(size)
    if framing:
        return opcode8 + _pack_uint8(size)
    raise OverflowError(f"serializing a {what} larger than 4 GiB requires pickle protocol 4 "
                        f"or higher")


class Pickler:
    """Write pickles of objects to a binary file, like ``pickle.Pickler``.

    Subclasses (or instances, by attribute) may define ``persistent_id(obj)``,
    ``reducer_override(obj)`` and ``dispatch_table``; they behave as documented
    for the standard library. The memo lives as long as the pickler: objects
    dumped by an earlier ``dump`` are written as memo references until
    :meth:`clear_memo`.
    """

    #: A pstore addition. Set it to False in a subclass whose ``persistent_id`` returns None
    #: for every ``str``, ``int``, ``float``, ``bool`` and ``None``: it is then not called
    #: for them (the standard library calls it for every object).
    persistent_id_for_atoms = True

    #: A pstore addition. None (the default), or a dict keyed by ``id(obj)``: when set,
    #: ``persistent_id`` is called for an exact ``dict``, ``list``, ``tuple``, ``set``,
    #: ``frozenset``, ``bytes`` or ``bytearray`` only if its id is a key of the dict; for
    #: the others the pickler takes the answer to be None. Set it when ``persistent_id``
    #: can only return an id for objects it has listed by id (the store's pickler sets its
    #: identity table: "is this container already a record?"). The dict is read as it is at
    #: each lookup, so it may change between and during dumps.
    persistent_id_for_ids: dict[int, Any] | None = None

    def __init__(self, file: Any, protocol: int | None = None, *, fix_imports: bool = True,
                 buffer_callback: Callable[[PickleBuffer], Any] | None = None) -> None:
        if protocol is None:
            protocol = DEFAULT_PROTOCOL
        elif protocol < 0:
            protocol = HIGHEST_PROTOCOL
        elif protocol > HIGHEST_PROTOCOL:
            raise ValueError(f"pickle protocol must be <= {HIGHEST_PROTOCOL}")
        if buffer_callback is not None and protocol < 5:
            raise ValueError("buffer_callback needs protocol >= 5")
        try:
            self._file_write = file.write
        except AttributeError:
            raise TypeError("file must have a 'write' attribute") from None
        self.proto = protocol
        self.bin = protocol >= 1
        self.fix_imports = fix_imports
        self.fast = False
        self._buffer_callback = buffer_callback
        #: id(obj) -> (memo index, obj); holding obj keeps its id from being reused. A dict,
        #: or with the C fast path on, the C ``Memo`` mapping (get, [], len, in, clear, copy).
        self.memo: Any = _memo_type()()
        self._hooks: tuple | None = None
        self._dump_functions: tuple[Callable[[Any], None], Callable[[Any], bytes]] | None = None

    def persistent_id(self, obj: Any) -> Any:
        """Return a persistent id for ``obj``, or None to pickle it by value (the default)."""
        return None

    def clear_memo(self) -> None:
        """Forget the objects already written, so the next dump writes them again in full."""
        self.memo.clear()

    def dump(self, obj: Any) -> None:
        """Write a pickle of ``obj`` to the file."""
        self._dumpers()[0](obj)

    def bytes_dumper(self) -> Callable[[Any], bytes]:
        """A pstore addition: a function that pickles one object as :meth:`dump` does (with
        this pickler's memo and hooks) and returns the pickle's bytes instead of writing
        them to the file.

        It is made for the hooks and the accelerator as they are now, and does not see a
        later change of them: call ``bytes_dumper()`` again after one. What it saves over
        ``dump`` is reading the hooks at every call, which counts when many small objects
        are pickled one at a time (the store's records).
        """
        return self._dumpers()[1]

    def _dumpers(self) -> tuple[Callable[[Any], None], Callable[[Any], bytes]]:
        """The dump functions for the hooks as they are now (see :func:`_make_dump`)."""
        if "_file_write" not in self.__dict__:
            raise PicklingError(f"Pickler.__init__() was not called by "
                                f"{type(self).__name__}.__init__()")
        # The hooks are read at every dump, so they may be set or changed at any time; the
        # dump functions built for them are kept as long as they stay the same.
        hooks = (self.persistent_id, getattr(self, "reducer_override", None),
                 getattr(self, "dispatch_table", copyreg.dispatch_table), self.fast,
                 self.persistent_id_for_atoms, self.persistent_id_for_ids)
        # The dict is compared by identity (it is kept alive by the dump built for it),
        # and the accelerator that was on when the dump was built, too.
        key = (*hooks[:-1], id(hooks[-1]), _accelerator)
        if key != self._hooks:
            self._dump_functions = _make_dump(self, *hooks)
            self._hooks = key
        return self._dump_functions  # type: ignore[return-value]  # no key equals the first


def _make_dump(pickler: Pickler, persistent_id: Callable[[Any], Any] | None,
               reducer_override: Callable[[Any], Any] | None, dispatch_table: Any,
               fast: bool, persistent_id_for_atoms: bool,
               persistent_id_for_ids: dict[int, Any] | None
               ) -> tuple[Callable[[Any], None], Callable[[Any], bytes]]:
    """Make the functions that write one pickle for ``pickler`` with these hooks: to its
    file, and to bytes returned."""
    proto = pickler.proto
    binary = pickler.bin
    framing = proto >= 4
    fix_imports = pickler.fix_imports and proto < 3
    buffer_callback = pickler._buffer_callback
    emit = pickler._file_write    # where finished bytes go: the file, or dump_to_bytes's parts
    proto_header = PROTO + bytes([proto]) if proto >= 2 else b""
    memo = pickler.memo
    if not memo and type(memo) is not _memo_type():
        # The implementation was switched since the memo was made: an empty memo is
        # replaced by one of the current kind (a filled one is kept, and decides).
        memo = pickler.memo = _memo_type()()
    memo_lookup = memo.get
    if getattr(persistent_id, "__func__", None) is Pickler.persistent_id:
        persistent_id = None   # the default returns None for everything: skip the call
    no_persistent_id = frozenset() if persistent_id_for_atoms else _ATOMS

    # The bytes of the current frame (protocol 4+), or bytes not yet handed to emit.
    buf = bytearray()
    write = buf.extend
    # Containers being saved, when pickler.fast leaves cycles to be detected by us.
    fast_active: set[int] = set()

    def end_frame():
        """End the current frame: give its bytes, with a FRAME header if worth it, to emit."""
        size = len(buf)
        if size:
            if framing and size >= FRAME_SIZE_MIN:
                emit(FRAME + _pack_uint8(size))
            emit(bytes(buf))
            buf.clear()

    def dump(obj):
        buf.clear()            # what an earlier dump that raised left behind
        fast_active.clear()
        if proto_header:
            emit(proto_header)   # outside any frame
        save_each((obj,))
        write(STOP)
        end_frame()

    def dump_to_bytes(obj):
        nonlocal emit
        parts: list[bytes] = []
        emit, previous = parts.append, emit
        try:
            dump(obj)
        finally:
            emit = previous
        return b"".join(parts)

    def write_payload(header, payload):
        """Write an opcode with a bytes-like argument; a large one goes outside any frame."""
        if len(payload) >= FRAME_SIZE_TARGET:
            end_frame()
            emit(header)
            emit(payload)
        else:
            write(header)
            write(payload)

    def memo_put(obj):
        if fast:
            return
        index = len(memo)
        memo[id(obj)] = (index, obj)
        if framing:
            write(MEMOIZE)
        elif binary:
            write(_BINPUT[index] if index < 256 else LONG_BINPUT + _pack_uint4(index))
        else:
            write(b"p%d\n" % index)

    def memo_get(index):
        if binary:
            write(_BINGET[index] if index < 256 else LONG_BINGET + _pack_uint4(index))
        else:
            write(b"g%d\n" % index)

    # -- the entry point --------------------------------------------------------------------

    def save_each(objects, pid_allowed=True):
        """Save each object in turn.

        This loop is the hot path. Container savers hand it all their items at once so
        that an item costs no function call, and the commonest atoms are written inline.
        """
        for obj in objects:
            if len(buf) >= FRAME_SIZE_TARGET:
                end_frame()
            cls = type(obj)
            if (persistent_id is not None and pid_allowed and cls not in no_persistent_id
                    and (persistent_id_for_ids is None or cls not in _PLAIN_CONTAINERS
                         or id(obj) in persistent_id_for_ids)):
                pid = persistent_id(obj)
                if pid is not None:
                    save_persistent_id(pid)
                    continue
            if cls is str:
                memoized = memo_lookup(id(obj))
                if memoized is not None:
                    if binary and memoized[0] < 256:
                        write(_BINGET[memoized[0]])
                    else:
                        memo_get(memoized[0])
                elif framing:
                    try:
                        data = obj.encode()
                    except UnicodeEncodeError:   # lone surrogates
                        data = obj.encode("utf-8", "surrogatepass")
                    if len(data) < 256:
                        write(_SHORT_BINUNICODE[len(data)])
                        write(data)
                        if not fast:
                            memo[id(obj)] = (len(memo), obj)
                            write(MEMOIZE)
                    else:
                        save_str(obj)
                else:
                    save_str(obj)
            elif cls is int:
                if binary and 0 <= obj < 0x10000:
                    write(_BININT1[obj] if obj < 0x100 else BININT2 + _pack_uint2(obj))
                else:
                    save_int(obj)
            elif cls is float:
                if binary:
                    write(BINFLOAT + _pack_double(obj))
                else:
                    write(FLOAT + repr(obj).encode("ascii") + b"\n")
            elif obj is None:
                write(NONE)
            elif cls is bool:
                if proto >= 2:
                    write(NEWTRUE if obj else NEWFALSE)
                else:
                    # Before protocol 2, INT with these two spellings means a bool.
                    write(b"I01\n" if obj else b"I00\n")
            else:
                memoized = memo_lookup(id(obj))
                if memoized is not None:
                    memo_get(memoized[0])
                else:
                    saver = savers.get(cls)
                    if saver is not None:
                        saver(obj)
                    else:
                        save_reducible(obj, cls)

    def save(obj):
        save_each((obj,))

    def save_reducible(obj, cls):
        """Save an object that is not in the memo and has no saver of its own."""
        if reducer_override is not None:
            reduced = reducer_override(obj)
            if reduced is not NotImplemented:
                save_reduced(obj, reduced)
                return
        if cls is type:
            save_type(obj)
            return
        if cls is FunctionType:
            save_global(obj)
            return
        try:
            reduce = dispatch_table[cls]
        except KeyError:
            reduce = None
        if reduce is not None:
            reduced = reduce(obj)
        elif issubclass(cls, type):
            save_global(obj)
            return
        else:
            reduce_ex = getattr(obj, "__reduce_ex__", None)
            if reduce_ex is not None:
                reduced = reduce_ex(proto)
            else:
                reduce = getattr(obj, "__reduce__", None)
                if reduce is None:
                    raise PicklingError(f"cannot pickle {cls.__name__!r} object: "
                                        f"it has neither __reduce_ex__ nor __reduce__")
                reduced = reduce()
        save_reduced(obj, reduced)

    def save_persistent_id(pid):
        if binary:
            save_each((pid,), False)
            write(BINPERSID)
        else:
            text = str(pid)
            if not text.isascii():
                raise PicklingError("persistent IDs in protocol 0 must be ASCII strings")
            write(PERSID + text.encode("ascii") + b"\n")

    # -- atoms: never memoized ----------------------------------------------------------------

    def save_int(obj):
        """The ints save_each does not write inline: negative, 2**16 and up, and protocol 0."""
        if binary:
            if -0x80000000 <= obj < 0x80000000:
                write(BININT + _pack_int4(obj))
                return
            if proto >= 2:
                data = _int_to_long_bytes(obj)
                size = len(data)
                if size < 256:
                    write(LONG1 + bytes([size]) + data)
                else:
                    write(LONG4 + _pack_int4(size) + data)
                return
        elif -0x80000000 <= obj < 0x80000000:
            write(b"I%d\n" % obj)
            return
        # Protocols 0 and 1: decimal text with Python 2's long suffix.
        write(b"L%dL\n" % obj)

    # -- strings and bytes --------------------------------------------------------------------

    def save_str(obj):
        if binary:
            data = obj.encode("utf-8", "surrogatepass")
            write_payload(_sized_header(len(data), _SHORT_BINUNICODE if framing else None,
                                        BINUNICODE, BINUNICODE8, framing, "string"), data)
        else:
            # UNICODE's argument ends at a newline, so newline (and the characters that
            # raw-unicode-escape would not escape but that text readers trip over) are
            # written as \u escapes.
            escaped = (obj.replace("\\", "\\u005c").replace("\0", "\\u0000")
                       .replace("\n", "\\u000a").replace("\r", "\\u000d")
                       .replace("\x1a", "\\u001a"))
            write(UNICODE + escaped.encode("raw-unicode-escape") + b"\n")
        memo_put(obj)

    def save_bytes_data(obj, data):
        """BINBYTES family for ``data`` (bytes or a read-only buffer), memoized as ``obj``."""
        write_payload(_sized_header(len(data), _SHORT_BINBYTES, BINBYTES, BINBYTES8, framing,
                                    "bytes object"), data)
        memo_put(obj)

    def save_bytearray_data(obj, data):
        write_payload(BYTEARRAY8 + _pack_uint8(len(data)), data)
        memo_put(obj)

    def save_bytes(obj):
        if proto >= 3:
            save_bytes_data(obj, obj)
        elif not obj:
            save_reduce(bytes, (), obj=obj)
        else:
            # Protocols 0-2 have no bytes opcode; codecs.encode(text, "latin1") rebuilds the
            # bytes under Python 3 and a str under Python 2.
            save_reduce(codecs.encode, (obj.decode("latin1"), "latin1"), obj=obj)

    def save_bytearray(obj):
        if proto >= 5:
            save_bytearray_data(obj, obj)
        elif not obj:
            save_reduce(bytearray, (), obj=obj)
        else:
            save_reduce(bytearray, (bytes(obj),), obj=obj)

    def save_picklebuffer(obj):
        if proto < 5:
            raise PicklingError("PickleBuffer can only be pickled with protocol >= 5")
        with memoryview(obj) as view:
            if not view.contiguous:
                raise PicklingError("PickleBuffer can not be pickled when pointing "
                                    "to a non-contiguous buffer")
            readonly = view.readonly
        if buffer_callback is None or buffer_callback(obj):
            data = obj.raw()
            (save_bytes_data if readonly else save_bytearray_data)(obj, data)
        else:
            write(NEXT_BUFFER)
            if readonly:
                write(READONLY_BUFFER)

    # -- containers -----------------------------------------------------------------------------

    def enter_fast(obj):
        """In fast mode there is no memo, so a cycle would recurse forever: refuse it."""
        key = id(obj)
        if key in fast_active:
            raise ValueError(f"fast mode: can't pickle cyclic objects including object "
                             f"type {type(obj).__name__} at {key:#x}")
        fast_active.add(key)

    def save_tuple(obj):
        size = len(obj)
        if size == 0:
            write(EMPTY_TUPLE if binary else MARK + TUPLE)
            return
        small = size <= 3 and proto >= 2
        if not small:
            write(MARK)
        save_each(obj)
        memoized = memo_lookup(id(obj))
        if memoized is not None:
            # The tuple is recursive: saving an item saved the tuple itself. Drop the items
            # just pushed and use the memoized tuple.
            if small:
                write(POP * size)
            elif binary:
                write(POP_MARK)
            else:
                write(POP * (size + 1))
            memo_get(memoized[0])
            return
        write(_TUPLE_OF_SIZE[size] if small else TUPLE)
        memo_put(obj)

    def save_list(obj):
        write(EMPTY_LIST if binary else MARK + LIST)
        memo_put(obj)
        if not obj:
            return
        if fast:
            enter_fast(obj)
        if not binary:
            batch_appends(iter(obj))
        elif len(obj) == 1:
            save(obj[0])
            write(APPEND)
        elif len(obj) <= BATCH_SIZE:
            write(MARK)
            save_each(obj)
            write(APPENDS)
        else:
            for start in range(0, len(obj), BATCH_SIZE):
                write(MARK)
                save_each(obj[start:start + BATCH_SIZE])
                write(APPENDS)
        if fast:
            fast_active.discard(id(obj))

    def save_dict(obj):
        write(EMPTY_DICT if binary else MARK + DICT)
        memo_put(obj)
        if not obj:
            return
        if fast:
            enter_fast(obj)
        if not binary:
            batch_setitems(iter(obj.items()))
        elif len(obj) == 1:
            save_each(_flatten(obj.items()))
            write(SETITEM)
        elif len(obj) < BATCH_SIZE:
            size = len(obj)
            write(MARK)
            save_each(_flatten(obj.items()))
            write(SETITEMS)
            if len(obj) != size:
                raise RuntimeError("dict changed size during iteration")
        else:
            save_in_batches(obj, _flatten(obj.items()), 2 * BATCH_SIZE, SETITEMS)
        if fast:
            fast_active.discard(id(obj))

    def save_set(obj):
        if proto < 4:
            save_reduce(set, (list(obj),), obj=obj)
            return
        write(EMPTY_SET)
        memo_put(obj)
        if obj:
            save_in_batches(obj, iter(obj), BATCH_SIZE, ADDITEMS)

    def save_in_batches(obj, items, batch_size, opcode):
        """MARK, items, opcode; again while a batch was full, as CPython does for exact
        dicts and sets: so a size that is a multiple of BATCH_SIZE ends with an empty batch.
        """
        size = len(obj)
        while True:
            batch = list(islice(items, batch_size))
            write(MARK)
            save_each(batch)
            write(opcode)
            if len(obj) != size:
                raise RuntimeError(f"{type(obj).__name__} changed size during iteration")
            if len(batch) < batch_size:
                return

    def save_frozenset(obj):
        if proto < 4:
            save_reduce(frozenset, (list(obj),), obj=obj)
            return
        write(MARK)
        save_each(obj)
        memoized = memo_lookup(id(obj))
        if memoized is not None:
            write(POP_MARK)   # recursive: saving an item saved the frozenset itself
            memo_get(memoized[0])
            return
        write(FROZENSET)
        memo_put(obj)

    def batch_appends(items):
        """APPEND or MARK ... APPENDS for the items of a list or a reduce value's listitems."""
        if not binary:
            for item in items:
                save(item)
                write(APPEND)
            return
        while True:
            batch = list(islice(items, BATCH_SIZE))
            if len(batch) == 1:
                save(batch[0])
                write(APPEND)
            elif batch:
                write(MARK)
                save_each(batch)
                write(APPENDS)
            if len(batch) < BATCH_SIZE:
                return

    def batch_setitems(items):
        """SETITEM or MARK ... SETITEMS for (key, value) pairs."""
        if not binary:
            for key, value in _checked_pairs(items):
                save(key)
                save(value)
                write(SETITEM)
            return
        pairs = _checked_pairs(items)
        while True:
            batch = list(islice(pairs, BATCH_SIZE))
            if len(batch) == 1:
                save_each(batch[0])
                write(SETITEM)
            elif batch:
                write(MARK)
                save_each(_flatten(batch))
                write(SETITEMS)
            if len(batch) < BATCH_SIZE:
                return

    savers: dict[type, Callable[[Any], None]] = {
        str: save_str, bytes: save_bytes, dict: save_dict, set: save_set,
        frozenset: save_frozenset, list: save_list, tuple: save_tuple,
        bytearray: save_bytearray, PickleBuffer: save_picklebuffer,
    }

    # -- globals ------------------------------------------------------------------------------

    def save_type(obj):
        if obj in _SINGLETON_TYPES:
            save_reduce(type, (_SINGLETON_TYPES[obj],), obj=obj)
        else:
            save_global(obj)

    def save_global(obj, name=None):
        if name is None:
            name = getattr(obj, "__qualname__", None)
            if name is None:
                name = obj.__name__
        path = name.split(".")
        if "<locals>" in path:
            raise PicklingError(f"Can't pickle local object {obj!r}")
        module_name = _which_module(obj, path)
        try:
            __import__(module_name, level=0)
            module = sys.modules[module_name]
        except (ImportError, KeyError, ValueError) as error:
            raise PicklingError(f"Can't pickle {obj!r}: import of module "
                                f"{module_name!r} failed") from error
        try:
            parent, found = _walk(module, path)
        except AttributeError:
            raise PicklingError(f"Can't pickle {obj!r}: attribute lookup {name} "
                                f"on {module_name} failed") from None
        if found is not obj:
            raise PicklingError(f"Can't pickle {obj!r}: it's not the same object "
                                f"as {module_name}.{name}")
        if proto >= 2:
            code = copyreg._extension_registry.get((module_name, name))  # type: ignore[attr-defined]
            if code:
                if code <= 0xFF:
                    write(EXT1 + bytes([code]))
                elif code <= 0xFFFF:
                    write(EXT2 + _pack_uint2(code))
                else:
                    write(EXT4 + _pack_int4(code))
                return
        if parent is module:
            # Found as an attribute of its module (through a path like "A.mod.A" too):
            # CPython names it by the path's last part.
            name = path[-1]
        if framing:
            save(module_name)
            save(name)
            write(STACK_GLOBAL)
        elif "." not in name:
            write_global(module_name, name)
        elif _DOTTED_NAME_AS_GETATTR_CHAIN:
            top, *attributes = name.split(".")
            for _ in attributes:
                save(getattr)
                if proto < 2:
                    write(MARK)
            write_global(module_name, top)
            for attribute in attributes:
                save(attribute)
                write((TUPLE if proto < 2 else TUPLE2) + REDUCE)
        else:
            save_reduce(getattr, (parent, path[-1]))
        memo_put(obj)

    def write_global(module_name, name):
        """GLOBAL module_name.name, a top-level name (not memoized)."""
        if fix_imports:
            module_name, name = python2_name(module_name, name)
        encoding = "utf-8" if proto >= 3 else "ascii"
        try:
            line = (module_name.encode(encoding) + b"\n" + name.encode(encoding) + b"\n")
        except UnicodeEncodeError:
            raise PicklingError(f"can't pickle global identifier {module_name}.{name} "
                                f"using pickle protocol {proto}") from None
        write(GLOBAL + line)

    # -- the reduce protocol ------------------------------------------------------------------

    def save_reduced(obj, reduced):
        """Save ``obj`` from what a reducer returned: a global's name, or a reduce tuple."""
        if isinstance(reduced, str):
            save_global(obj, reduced)
            return
        if not isinstance(reduced, tuple):
            raise PicklingError(f"__reduce__ must return a string or tuple, "
                                f"not {type(reduced).__name__}")
        if not 2 <= len(reduced) <= 6:
            raise PicklingError("tuple returned by __reduce__ must contain 2 through 6 elements")
        save_reduce(*reduced, obj=obj)

    def save_reduce(func, args, state=None, listitems=None, dictitems=None, state_setter=None,
                    *, obj=None):
        if not callable(func):
            raise PicklingError("first item of the tuple returned by __reduce__ must be callable")
        if not isinstance(args, tuple):
            raise PicklingError("second item of the tuple returned by __reduce__ must be a tuple")
        if listitems is not None and not isinstance(listitems, Iterator):
            raise PicklingError(f"fourth element of the tuple returned by __reduce__ must be "
                                f"an iterator, not {type(listitems).__name__}")
        if dictitems is not None and not isinstance(dictitems, Iterator):
            raise PicklingError(f"fifth element of the tuple returned by __reduce__ must be "
                                f"an iterator, not {type(dictitems).__name__}")
        if state_setter is not None and not callable(state_setter):
            raise PicklingError(f"sixth element of the tuple returned by __reduce__ must be "
                                f"a function, not {type(state_setter).__name__}")

        func_name = getattr(func, "__name__", "") if proto >= 2 else ""
        if func_name == "__newobj_ex__":
            cls, new_args, kwargs = _check_newobj_ex(args, obj)
            if proto >= 4:
                save(cls)
                save(new_args)
                save(kwargs)
                write(NEWOBJ_EX)
            else:
                save_reduce(_partial(cls.__new__, cls, *new_args, **kwargs), ())
        elif func_name == "__newobj__":
            if not args:
                raise PicklingError("__newobj__ arglist is empty")
            cls = args[0]
            if not isinstance(cls, type):
                raise PicklingError("args[0] from __newobj__ args is not a type")
            if obj is not None and getattr(obj, "__class__", None) is not cls:
                raise PicklingError("args[0] from __newobj__ args has the wrong class")
            save(cls)
            save(args[1:])
            write(NEWOBJ)
        else:
            save(func)
            save(args)
            write(REDUCE)

        if obj is not None:
            memoized = memo_lookup(id(obj))
            if memoized is not None:
                # Saving the arguments saved obj itself (a recursive reduce): use that copy.
                write(POP)
                memo_get(memoized[0])
                return
            memo_put(obj)
        if listitems is not None:
            batch_appends(listitems)
        if dictitems is not None:
            batch_setitems(dictitems)
        if state is not None:
            if state_setter is None:
                save(state)
                write(BUILD)
            else:
                # state_setter(obj, state) is called for its effect on obj; its result is
                # dropped.
                save(state_setter)
                save(obj)
                save(state)
                write(TUPLE2 + REDUCE + POP)

    if _accelerator is not None and binary and not fast and type(memo) is _accelerator.Memo:
        # C takes the plain data (see _pickler_speedups.c) and hands the rest back to the
        # loop above, one object at a time; every other saver reaches C through these names.
        save_each_in_python = save_each

        def save_other(obj):
            save_each_in_python((obj,))

        saver = _accelerator.Saver(
            buf, memo, proto, persistent_id, persistent_id_for_atoms, persistent_id_for_ids,
            (end_frame, save_other, save_persistent_id, save_str, save_int, save_bytes,
             save_bytearray))
        save_each = saver.save_each
        save = saver.save

    return dump, dump_to_bytes


_flatten = chain.from_iterable   # (k1, v1), (k2, v2) -> k1, v1, k2, v2


def _checked_pairs(items: Iterator[Any]) -> Iterator[tuple[Any, Any]]:
    for pair in items:
        if type(pair) is not tuple or len(pair) != 2:
            raise TypeError("dict items iterator must return 2-tuples")
        yield pair


def _check_newobj_ex(args: tuple, obj: Any) -> tuple[type, tuple, dict]:
    if len(args) != 3:
        raise PicklingError(f"length of the NEWOBJ_EX argument tuple must be exactly 3, "
                            f"not {len(args)}")
    cls, new_args, kwargs = args
    if not isinstance(cls, type):
        raise PicklingError(f"first item from NEWOBJ_EX argument tuple must be a class, "
                            f"not {type(cls).__name__}")
    if obj is not None and getattr(obj, "__class__", None) is not cls:
        raise PicklingError("first item from NEWOBJ_EX argument tuple has the wrong class")
    if not isinstance(new_args, tuple):
        raise PicklingError(f"second item from NEWOBJ_EX argument tuple must be a tuple, "
                            f"not {type(new_args).__name__}")
    if not isinstance(kwargs, dict):
        raise PicklingError(f"third item from NEWOBJ_EX argument tuple must be a dict, "
                            f"not {type(kwargs).__name__}")
    return cls, new_args, kwargs


def _walk(module: Any, path: list[str]) -> tuple[Any, Any]:
    """Follow a dotted path from a module; return (parent, attribute)."""
    parent, found = None, module
    for part in path:
        parent, found = found, getattr(found, part)
    return parent, found


def _which_module(obj: Any, path: list[str]) -> str:
    """The name of the module ``obj`` is found in: its ``__module__``, else a search."""
    module_name = getattr(obj, "__module__", None)
    if module_name is not None:
        return module_name
    for module_name, module in sys.modules.copy().items():
        if module_name == "__main__" or module is None:
            continue
        try:
            if _walk(module, path)[1] is obj:
                return module_name
        except AttributeError:
            pass
    return "__main__"


class _Unwritten:
    """The file of the picklers :func:`dumps` makes: they pickle only through
    :meth:`Pickler.bytes_dumper`, which writes no file."""

    def write(self, data: Any) -> None:
        raise AssertionError("dumps() pickles to bytes, never to its pickler's file")


class _IdlePicklers(threading.local):
    """Picklers that :func:`dumps` may reuse, per thread, keyed by (protocol, fix_imports).

    Building a pickler's closures costs more than pickling a small object, so dumps()
    keeps one per thread. A pickler is taken out while in use, so a dumps() called
    during another (from a __reduce__, say) builds its own.
    """

    def __init__(self) -> None:
        self.by_options: dict[tuple[int | None, bool], Pickler] = {}


_idle_picklers = _IdlePicklers()


def dump(obj: Any, file: Any, protocol: int | None = None, *, fix_imports: bool = True,
         buffer_callback: Callable[[PickleBuffer], Any] | None = None) -> None:
    """Write a pickle of ``obj`` to the binary file ``file``."""
    Pickler(file, protocol, fix_imports=fix_imports, buffer_callback=buffer_callback).dump(obj)


def dumps(obj: Any, protocol: int | None = None, *, fix_imports: bool = True,
          buffer_callback: Callable[[PickleBuffer], Any] | None = None) -> bytes:
    """Return a pickle of ``obj`` as bytes: the same bytes ``pickle.dumps`` writes."""
    if buffer_callback is not None:
        return Pickler(_Unwritten(), protocol, fix_imports=fix_imports,
                       buffer_callback=buffer_callback).bytes_dumper()(obj)
    idle = _idle_picklers.by_options
    options = (protocol, fix_imports)
    pickler = idle.pop(options, None) or Pickler(_Unwritten(), protocol, fix_imports=fix_imports)
    try:
        return pickler.bytes_dumper()(obj)
    finally:
        pickler.clear_memo()   # and so let go of every object of this dump
        idle[options] = pickler
