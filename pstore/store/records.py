"""A record's bytes: a pickle, or an envelope holding a pickle and the blobs it uses.

Most records are just the pickle of their root object. A record whose pickle
has out-of-band buffers (protocol 5) or is compressed is wrapped in an
envelope (``docs/format.md``, "Record envelopes"):

* byte 0: ``0xFF``, which no pickle starts with;
* byte 1: the envelope's version (1); byte 2: the pickle's codec;
* 4 bytes: the number of blobs, then per blob its codec (1 byte), the size of
  its buffer (8 bytes) and the digest that names it (32 bytes), all little-endian,
  in the order the pickle's ``NEXT_BUFFER`` opcodes take them;
* the pickle, compressed with its codec.

Codecs: 0 none, 1 zlib, 2 lzma. A blob stored with codec 0 is mapped into
memory when loaded; a compressed one is decompressed into one buffer.
"""

from __future__ import annotations

import lzma
import struct
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from ..backends import Backend

__all__ = ["BlobRef", "CODECS", "ENVELOPE", "pack", "unpack", "write_blob", "read_blob"]

#: The first byte of an envelope; a record starting with any other byte is a plain pickle.
ENVELOPE = b"\xff"
_VERSION = 1
_HEADER = struct.Struct("<BBBI")    # ENVELOPE, version, pickle codec, number of blobs
_BLOB = struct.Struct("<BQ32s")     # codec, buffer size, digest

#: compression name (as :func:`pstore.open` takes it) -> codec number.
CODECS = {None: 0, "zlib": 1, "lzma": 2}
_CODEC_NAMES = {number: name for name, number in CODECS.items()}
#: Records shorter than this are not worth compressing.
_COMPRESS_MIN = 512
_CHUNK = 1 << 20


class BlobRef(NamedTuple):
    """One out-of-band buffer of a record: which blob holds it, how, and its size."""

    name: str       # the blob's digest, 64 hex digits
    size: int       # bytes of the buffer (uncompressed)
    codec: int      # how the blob file stores them


def pack(pickle: bytes, blobs: list[BlobRef], codec: int) -> bytes:
    """The record of ``pickle`` with out-of-band ``blobs``, compressed with ``codec``.

    A plain pickle when there is nothing to wrap (no blobs, and compression
    not asked for or not worth it).
    """
    if codec and len(pickle) >= _COMPRESS_MIN:
        compressed = _compress(codec, pickle)
        if len(compressed) < len(pickle):
            pickle = compressed
        else:
            codec = 0
    else:
        codec = 0
    if not blobs and not codec:
        return pickle
    header = _HEADER.pack(ENVELOPE[0], _VERSION, codec, len(blobs))
    return b"".join([header, *(_BLOB.pack(blob.codec, blob.size, bytes.fromhex(blob.name))
                               for blob in blobs), pickle])


def unpack(data: bytes) -> tuple[bytes, list[BlobRef]]:
    """The pickle of envelope ``data`` and its blobs; ``ValueError`` if it is malformed."""
    try:
        marker, version, codec, count = _HEADER.unpack_from(data)
        if version != _VERSION:
            raise ValueError(f"an envelope of version {version} (this pstore reads {_VERSION})")
        if codec not in _CODEC_NAMES:
            raise ValueError(f"record codec {codec} is unknown")
        blobs = []
        position = _HEADER.size
        for _ in range(count):
            blob_codec, size, digest = _BLOB.unpack_from(data, position)
            position += _BLOB.size
            if blob_codec not in _CODEC_NAMES:
                raise ValueError(f"blob codec {blob_codec} is unknown")
            blobs.append(BlobRef(digest.hex(), size, blob_codec))
        pickle = data[position:]
        if codec:
            pickle = _decompress(codec, pickle)
        return pickle, blobs
    except (struct.error, zlib.error, lzma.LZMAError) as error:
        raise ValueError(f"a malformed envelope ({error})") from None


def write_blob(backend: Backend, raw: memoryview, codec: int) -> BlobRef:
    """Store buffer ``raw`` as a blob with ``codec``, streamed: no copy of it is made."""
    chunks: Iterable[Any] = (raw,) if not codec else _compressed_chunks(codec, raw)
    return BlobRef(backend.put_blob(chunks), raw.nbytes, codec)


def read_blob(backend: Backend, blob: BlobRef, writable: bool) -> Any:
    """The buffer of ``blob``: mapped if stored uncompressed, else decompressed once."""
    if not blob.codec:
        return backend.get_blob(blob.name, blob.size, writable=writable)
    buffer = bytearray(blob.size)
    filled = _decompress_into(blob.codec, backend.read_blob(blob.name), memoryview(buffer))
    if filled != blob.size:
        raise ValueError(f"blob {blob.name} holds {filled} bytes, its record says {blob.size}")
    return buffer if writable else memoryview(buffer).toreadonly()



def _compressor(codec: int) -> Any:
    return zlib.compressobj() if codec == 1 else lzma.LZMACompressor()


def _compress(codec: int, data: bytes) -> bytes:
    compressor = _compressor(codec)
    return compressor.compress(data) + compressor.flush()


def _decompress(codec: int, data: bytes) -> bytes:
    return zlib.decompress(data) if codec == 1 else lzma.decompress(data, lzma.FORMAT_XZ)


def _compressed_chunks(codec: int, raw: memoryview) -> Iterator[bytes]:
    compressor = _compressor(codec)
    for start in range(0, raw.nbytes, _CHUNK):
        yield compressor.compress(raw[start:start + _CHUNK])
    yield compressor.flush()


def _decompress_into(codec: int, chunks: Iterable[bytes], out: memoryview) -> int:
    """Decompress ``chunks`` into ``out``, a bounded piece at a time; return the bytes written.

    Raises ``ValueError`` if the output would not fit: a corrupt or hostile blob
    cannot make this allocate more than its record announced.
    """
    filled = 0

    def put(piece: bytes) -> None:
        nonlocal filled
        if filled + len(piece) > len(out):
            raise ValueError("a compressed blob holds more bytes than its record says")
        out[filled:filled + len(piece)] = piece
        filled += len(piece)

    try:
        if codec == 1:
            inflater = zlib.decompressobj()
            for chunk in chunks:
                while chunk:
                    put(inflater.decompress(chunk, _CHUNK))
                    chunk = inflater.unconsumed_tail
            put(inflater.flush())
        else:
            unxz = lzma.LZMADecompressor(lzma.FORMAT_XZ)
            for chunk in chunks:
                put(unxz.decompress(chunk, _CHUNK))
                while not unxz.needs_input and not unxz.eof:
                    put(unxz.decompress(b"", _CHUNK))
    except (zlib.error, lzma.LZMAError) as error:
        raise ValueError(f"a corrupt compressed blob ({error})") from None
    return filled
