"""Blob I/O and compression for records: streamed, and bounded when reading.

Compressed bytes are never trusted for their size: decompression runs a
bounded piece at a time and stops as soon as the output would pass the size
the record declares, and output buffers grow as data arrives (a blob that
declares gigabytes but holds a few bytes costs a few bytes). Errors are
``ValueError`` naming what went wrong; the store adds which record or blob.

zstd (codec 3) comes from the stdlib's ``compression.zstd`` where the interpreter
has it (3.14+), else from the ``zstandard`` package (``pip install 'pstore[zstd]'``);
with neither, compressing or decompressing it raises
:class:`~pstore.errors.MissingModuleError` (a ``ModuleNotFoundError``) saying so.
The other codecs are the stdlib's ``zlib`` and ``lzma``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import MissingModuleError

if TYPE_CHECKING:   # only for annotations: this module works on any backend
    from ..backends import Backend, ReadableBackend

__all__ = [
    "CODECS",
    "CODEC_NAMES",
    "BlobRef",
    "compress",
    "decompress",
    "read_blob",
    "write_blob",
    "zstd_module",
]

#: compression name (as :func:`pstore.open` takes it) -> codec number.
CODECS = {None: 0, "zlib": 1, "lzma": 2, "zstd": 3}
#: codec number -> compression name.
CODEC_NAMES = {number: name for name, number in CODECS.items()}
_CHUNK = 1 << 20    # bytes compressed, or decompressed, per step
_ZLIB, _LZMA, _ZSTD = CODECS["zlib"], CODECS["lzma"], CODECS["zstd"]
# zstandard's decompressor has no bound on its output, only on its input: each step feeds
# it this many bytes. A zstd block makes at most 128 KiB from 4 bytes (an RLE block), so
# one step makes at most 1 KiB * 32768 = 32 MiB more than asked for.
_ZSTANDARD_STEP = 1 << 10


class BlobRef(NamedTuple):
    """One out-of-band buffer of a record: which blob holds it, how, and its size."""

    name: str       # the blob's name: its digest (pstore.backends.blobs.digest_of_name)
    size: int       # bytes of the buffer (uncompressed)
    codec: int      # how the blob file stores them


def _lzma() -> Any:
    """The lzma module, imported at first use: most stores never need it (cold start)."""
    import lzma
    return lzma


def zstd_module() -> Any:
    """The zstd this interpreter has: the stdlib's ``compression.zstd`` (Python 3.14+),
    else the ``zstandard`` package; :class:`~pstore.errors.MissingModuleError` naming what
    to install."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
        return zstd
    except ImportError:
        pass
    try:
        import zstandard
        return zstandard
    except ImportError:
        raise MissingModuleError("zstandard", "zstd compression",
                                 "pip install 'pstore[zstd]' (or use Python 3.14+, whose "
                                 "stdlib has compression.zstd)") from None


def _compressor(codec: int) -> Any:
    """An object with ``compress(data)`` and ``flush()`` (which ends the stream)."""
    if codec == _ZLIB:
        return zlib.compressobj()
    if codec == _LZMA:
        return _lzma().LZMACompressor()
    zstd = zstd_module()
    if zstd.__name__ == "zstandard":
        return zstd.ZstdCompressor().compressobj()
    return zstd.ZstdCompressor()


def _decompressor(codec: int) -> Any:
    """An object like ``lzma.LZMADecompressor``: ``decompress(data, max_length)``,
    ``needs_input`` and ``eof``."""
    if codec == _LZMA:
        lzma = _lzma()
        return lzma.LZMADecompressor(lzma.FORMAT_XZ)
    zstd = zstd_module()
    if zstd.__name__ == "zstandard":
        return _ZstandardDecompressor(zstd)
    return zstd.ZstdDecompressor()


class _ZstandardDecompressor:
    """zstandard's decompressor behind the interface of ``lzma.LZMADecompressor``: the
    input is fed a bounded step at a time (see ``_ZSTANDARD_STEP``), what it makes past
    ``max_length`` kept for the next call."""

    def __init__(self, zstandard: Any) -> None:
        self._inner = zstandard.ZstdDecompressor().decompressobj()
        self._input = memoryview(b"")
        self._output = memoryview(b"")     # made, not yet returned

    @property
    def eof(self) -> bool:
        return self._inner.eof and not self._output

    @property
    def needs_input(self) -> bool:
        return not self._input and not self._output and not self._inner.eof

    def decompress(self, data: bytes, max_length: int) -> bytes:
        if data:
            self._input = memoryview(data)
        while not self._output and self._input and not self._inner.eof:
            self._output = memoryview(self._inner.decompress(self._input[:_ZSTANDARD_STEP]))
            self._input = self._input[_ZSTANDARD_STEP:]
        piece, self._output = self._output[:max_length], self._output[max_length:]
        return bytes(piece)


def compress(codec: int, data: bytes) -> bytes:
    """``data`` compressed as one stream with ``codec`` (1 zlib, 2 xz, 3 zstd)."""
    compressor = _compressor(codec)
    return compressor.compress(data) + compressor.flush()


def _compressed_chunks(codec: int, raw: memoryview) -> Iterator[bytes]:
    compressor = _compressor(codec)
    for start in range(0, raw.nbytes, _CHUNK):
        yield compressor.compress(raw[start:start + _CHUNK])
    yield compressor.flush()


def _decompressed(codec: int, chunks: Iterable[bytes], limit: int) -> bytearray:
    """The bytes of the stream ``chunks``, decompressed a bounded piece at a time.

    Raises ``ValueError`` when they pass ``limit`` bytes (checked before the next
    piece is asked for, so at most ``limit`` + one piece is ever held), when the
    stream is corrupt or ends early, and when memory runs out.
    """
    corrupt: tuple[type[BaseException], ...] = (zlib.error, EOFError)
    if codec == _LZMA:
        corrupt += (_lzma().LZMAError,)
    elif codec == _ZSTD:
        corrupt += (zstd_module().ZstdError,)
    out = bytearray()

    def put(piece: bytes) -> None:
        if len(out) + len(piece) > limit:
            raise ValueError(f"it decompresses to more than the {limit} bytes it declares")
        out.extend(piece)

    try:
        if codec == _ZLIB:
            inflater = zlib.decompressobj()
            for chunk in chunks:
                while chunk and not inflater.eof:
                    put(inflater.decompress(chunk, min(_CHUNK, limit - len(out) + 1)))
                    chunk = inflater.unconsumed_tail
            put(inflater.flush())
            finished = inflater.eof
        else:
            decompressor = _decompressor(codec)
            for chunk in chunks:
                if decompressor.eof:
                    break
                put(decompressor.decompress(chunk, min(_CHUNK, limit - len(out) + 1)))
                while not decompressor.needs_input and not decompressor.eof:
                    put(decompressor.decompress(b"", min(_CHUNK, limit - len(out) + 1)))
            finished = decompressor.eof
    except corrupt as error:
        raise ValueError(f"a corrupt compressed stream ({error})") from None
    except MemoryError:
        raise ValueError(f"out of memory decompressing it ({len(out)} bytes so far)") from None
    if not finished:
        raise ValueError("the compressed stream ends early")
    return out


def decompress(codec: int, data: bytes, limit: int) -> bytes:
    """``data``, a stream compressed with ``codec``, decompressed: at most ``limit`` bytes."""
    return bytes(_decompressed(codec, (data,), limit))


def write_blob(backend: Backend, raw: memoryview, codec: int) -> BlobRef:
    """Store buffer ``raw`` as a blob with ``codec``, streamed: no copy of it is made."""
    chunks: Iterable[Any] = (raw,) if not codec else _compressed_chunks(codec, raw)
    return BlobRef(backend.put_blob(chunks), raw.nbytes, codec)


def read_blob(backend: ReadableBackend, blob: BlobRef, writable: bool) -> Any:
    """The buffer of ``blob``: mapped if stored uncompressed, else decompressed as it arrives.

    Raises ``ValueError`` if a compressed blob does not hold exactly the bytes its
    record declares.
    """
    if not blob.codec:
        return backend.get_blob(blob.name, blob.size, writable=writable)
    buffer = _decompressed(blob.codec, backend.read_blob(blob.name), blob.size)
    if len(buffer) != blob.size:
        raise ValueError(f"blob {blob.name} holds {len(buffer)} bytes, its record says "
                         f"{blob.size}")
    return buffer if writable else memoryview(buffer).toreadonly()
