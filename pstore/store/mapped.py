"""The blobs a Store has mapped, found again by the address of their memory.

Re-storing a value whose arrays are mapped blobs of this very store
(``s["copy"] = s["ds"]``) must not hash and copy gigabytes back into blobs the
store already has. When a blob is mapped it is noted here by the address of the
mapping; when the record pickler is offered an out-of-band buffer, a buffer that
is exactly one noted mapping (same start, same length) is written as a reference
to its blob. Entries go when their mapping is freed (a weak reference), so an
address reused by a later mapping never names the wrong blob; a mapping closed
explicitly (an ``mmap`` has ``closed``) is ignored.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Generic, TypeVar

__all__ = ["MappedBlobs", "buffer_address"]

Blob = TypeVar("Blob")


def buffer_address(obj: Any) -> int:
    """The address of the first byte of ``obj``'s buffer (read-only buffers too)."""
    ctypes, view_type, get_buffer, release_buffer = _buffer_api()
    view = view_type()
    get_buffer(obj, ctypes.byref(view), 0)     # PyBUF_SIMPLE; raises as Python would
    try:
        return view.buf or 0
    finally:
        release_buffer(ctypes.byref(view))


@functools.cache
def _buffer_api() -> tuple[Any, Any, Any, Any]:
    """ctypes, the C struct ``Py_buffer`` (the buffer protocol's view; its layout is stable
    ABI), ``PyObject_GetBuffer`` and ``PyBuffer_Release``: made at the first blob mapped,
    since importing ctypes costs a millisecond of ``import pstore``."""
    import ctypes

    class PyBuffer(ctypes.Structure):
        _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object),
                    ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                    ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                    ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                    ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                    ("internal", ctypes.c_void_p)]

    get_buffer = ctypes.pythonapi.PyObject_GetBuffer
    get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(PyBuffer), ctypes.c_int]
    release_buffer = ctypes.pythonapi.PyBuffer_Release
    release_buffer.argtypes = [ctypes.POINTER(PyBuffer)]
    return ctypes, PyBuffer, get_buffer, release_buffer


class MappedBlobs(Generic[Blob]):
    """address -> blob, for the mappings one Store made."""

    def __init__(self) -> None:
        self._by_address: dict[int, tuple[int, weakref.ref[Any], Blob]] = {}

    def add(self, mapping: Any, blob: Blob) -> None:
        """Note that ``mapping`` (an ``mmap``) holds exactly the bytes of ``blob``; a buffer
        that cannot be weakly referenced (a backend's ``bytearray``) is not noted."""
        size = len(mapping)
        if not size:
            return
        address = buffer_address(mapping)
        try:
            # The callback runs as the mapping is freed, before its memory is unmapped: no
            # later mapping can have the address yet.
            ref = weakref.ref(mapping, lambda dead: self._forget(address, dead))
        except TypeError:
            return
        self._by_address[address] = (size, ref, blob)

    def _forget(self, address: int, dead: weakref.ref[Any]) -> None:
        entry = self._by_address.get(address)
        if entry is not None and entry[1] is dead:
            del self._by_address[address]

    def find(self, buffer: memoryview) -> Blob | None:
        """The blob whose mapping ``buffer`` is, whole and unchanged in extent, or None."""
        if not self._by_address or not buffer.contiguous:
            return None
        entry = self._by_address.get(buffer_address(buffer))
        if entry is None:
            return None
        size, mapping, blob = entry
        live = mapping()
        if live is None or getattr(live, "closed", False) or buffer.nbytes != size:
            return None
        return blob
