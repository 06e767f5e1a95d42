"""Blob I/O and compression for records: streamed, and bounded when reading.

Compressed bytes are never trusted for their size: decompression runs a
bounded piece at a time and stops as soon as the output would pass the size
the record declares, and output buffers grow as data arrives (a blob that
declares gigabytes but holds a few bytes costs a few bytes). Errors are
``ValueError`` naming what went wrong; the store adds which record or blob.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:   # only for annotations: this module works on any backend
    from ..backends import Backend

__all__ = ["BlobRef", "CODECS", "CODEC_NAMES", "compress", "decompress", "write_blob", "read_blob"]

#: compression name (as :func:`pstore.open` takes it) -> codec number.
CODECS = {None: 0, "zlib": 1, "lzma": 2}
#: codec number -> compression name.
CODEC_NAMES = {number: name for name, number in CODECS.items()}
_CHUNK = 1 << 20    # bytes compressed, or decompressed, per step


class BlobRef(NamedTuple):
    """One out-of-band buffer of a record: which blob holds it, how, and its size."""

    name: str       # the blob's name: its digest (pstore.backends.blobs.digest_of_name)
    size: int       # bytes of the buffer (uncompressed)
    codec: int      # how the blob file stores them


def _compressor(codec: int) -> Any:
    return zlib.compressobj() if codec == 1 else lzma.LZMACompressor()


def compress(codec: int, data: bytes) -> bytes:
    """``data`` compressed as one stream with ``codec`` (1 zlib, 2 xz)."""
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
    out = bytearray()

    def put(piece: bytes) -> None:
        if len(out) + len(piece) > limit:
            raise ValueError(f"it decompresses to more than the {limit} bytes it declares")
        out.extend(piece)

    try:
        if codec == 1:
            inflater = zlib.decompressobj()
            for chunk in chunks:
                while chunk and not inflater.eof:
                    put(inflater.decompress(chunk, min(_CHUNK, limit - len(out) + 1)))
                    chunk = inflater.unconsumed_tail
            put(inflater.flush())
            finished = inflater.eof
        else:
            unxz = lzma.LZMADecompressor(lzma.FORMAT_XZ)
            for chunk in chunks:
                if unxz.eof:
                    break
                put(unxz.decompress(chunk, min(_CHUNK, limit - len(out) + 1)))
                while not unxz.needs_input and not unxz.eof:
                    put(unxz.decompress(b"", min(_CHUNK, limit - len(out) + 1)))
            finished = unxz.eof
    except (zlib.error, lzma.LZMAError, EOFError) as error:
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


def read_blob(backend: Backend, blob: BlobRef, writable: bool) -> Any:
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
