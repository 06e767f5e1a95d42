"""A record's bytes: its envelope, holding its payload, its blobs and its digest.

Every record of format version 3 is an envelope (``docs/format.md``, "Record
envelopes"), little-endian:

* byte 0: ``0xFF``, which no pickle starts with; byte 1: the envelope's version
  (2); byte 2: the payload's codec; 4 bytes: the number of blobs; 8 bytes: the
  payload's size, uncompressed;
* per blob one byte holding its codec (low 4 bits) and the hash that names it
  (high 4 bits: 0 the BLAKE2b tree of format version 3, 1 BLAKE3), the size of
  its buffer (8 bytes) and the digest that names it (32 bytes), in the order the
  pickle's ``NEXT_BUFFER`` opcodes take them;
* the payload (one pickle, or a Persistent object's two), compressed with its codec;
* a 16-byte digest of everything before it: keyed BLAKE2b, whose salt holds the
  object id and the format version, so a record moved to another id or read as
  another version does not verify. The key is ``b""`` today; a store's signing
  key takes its place later without a change of layout.

Stores of format version 2 hold records without a digest -- a plain pickle, or
an envelope of version 1 (no payload size, no digest) -- which :func:`unpack`
still reads when told they may be there.

Codecs: 0 none, 1 zlib, 2 lzma, 3 zstd. This module only encodes and decodes bytes;
blob I/O and compression are in :mod:`.blobio`.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any, NamedTuple

from ..backends.blob_names import digest_of_name, name_of_digest
from . import blobio
from .blobio import CODECS, BlobRef

__all__ = ["BlobRef", "CODECS", "DIGEST_FORMAT_VERSION", "DIGEST_SIZE", "ENVELOPE", "Unpacked",
           "pack", "unpack"]

#: The first byte of an envelope; a record starting with any other byte is a plain
#: pickle (format version 2 only).
ENVELOPE = b"\xff"
#: The store format version the digest covers (and the first that has one).
DIGEST_FORMAT_VERSION = 3
#: Bytes of a record's digest.
DIGEST_SIZE = 16
_VERSION = 2            # the envelope's own version; 1 is format version 2's, without digest
_OLD_VERSION = 1
_HEADER = struct.Struct("<BBBIQ")   # ENVELOPE, version, payload codec, blobs, payload size
_OLD_HEADER = struct.Struct("<BBBI")    # envelope version 1: no payload size
_BLOB = struct.Struct("<BQ32s")     # codec | naming << 4, buffer size, digest
_SALT = struct.Struct("<QB")        # object id, format version (BLAKE2b pads the salt)
_PERSON = b"pstore-record"
#: Payloads shorter than this are not worth compressing.
_COMPRESS_MIN = 512


class Unpacked(NamedTuple):
    """What :func:`unpack` found in a record."""

    payload: bytes          # the pickle(s), decompressed
    blobs: list[BlobRef]    # the out-of-band buffers, in order
    verified: bool          # whether a digest vouched for these bytes (False: format 2)


_unpack_header = _HEADER.unpack_from


def _new_unpacked(fields: tuple[bytes, list[BlobRef], bool]) -> Unpacked:
    return tuple.__new__(Unpacked, fields)


def _hasher(oid: int, key: bytes, first: memoryview | bytes) -> Any:
    return hashlib.blake2b(first, digest_size=DIGEST_SIZE, key=key, person=_PERSON,
                           salt=_SALT.pack(oid, DIGEST_FORMAT_VERSION))


def _digest(oid: int, body: memoryview | bytes, key: bytes) -> bytes:
    return _hasher(oid, key, body).digest()


def _pack_blob(blob: BlobRef) -> bytes:
    found = digest_of_name(blob.name)
    if found is None:
        raise ValueError(f"{blob.name!r} is not a blob name")
    naming, digest = found
    return _BLOB.pack(blob.codec | naming << 4, blob.size, digest)


def pack(oid: int, payload: bytes, blobs: list[BlobRef], codec: int, *, key: bytes = b"") -> bytes:
    """The record of object id ``oid``: ``payload`` with out-of-band ``blobs``, compressed
    with ``codec`` when that makes it smaller, and its digest under ``key``."""
    size = len(payload)
    if codec and size >= _COMPRESS_MIN:
        compressed = blobio.compress(codec, payload)
        if len(compressed) < size:
            payload = compressed
        else:
            codec = 0
    else:
        codec = 0
    header = _HEADER.pack(ENVELOPE[0], _VERSION, codec, len(blobs), size)
    if blobs:
        header += b"".join([_pack_blob(blob) for blob in blobs])
    hasher = _hasher(oid, key, header)
    hasher.update(payload)      # hashed apart: a large payload is copied once, not twice
    return b"".join([header, payload, hasher.digest()])


def unpack(data: bytes, oid: int, *, key: bytes = b"", digest_required: bool = True,
           max_size: int = 1 << 30, check_digest: bool = True) -> Unpacked:
    """The payload, blobs and verification of record ``oid`` whose bytes are ``data``.

    ``digest_required``: False only where the record may predate format version 3
    (then a plain pickle or a version 1 envelope is read unverified).
    ``check_digest``: False for tools that look at a record's bytes without loading
    them (``pstore ls``, ``dis``): the digest is not compared, and the result is
    never ``verified``. A payload
    larger than it declares, or than ``max_size``, is not decompressed past that.
    Raises ``ValueError`` saying what is wrong, before any payload byte is trusted.
    """
    if data[:1] != ENVELOPE:
        if digest_required:
            raise ValueError("the record has no envelope (so no digest)")
        return Unpacked(data, [], False)
    try:
        version = data[1]
        if version == _VERSION:
            _, _, codec, count, size = _unpack_header(data)
            start = _HEADER.size
            end = len(data) - DIGEST_SIZE
            if end < start:
                raise ValueError(f"the record is {len(data)} bytes, shorter than its header")
            # A small record is cheaper to slice than to view.
            body = data[:end] if end < 4096 else memoryview(data)[:end]
            if check_digest and data[end:] != _digest(oid, body, key):
                raise ValueError("the record's digest does not match its bytes")
            if not (codec or count):    # the common case: a small plain record
                if end - start != size:
                    raise ValueError(f"the payload is {end - start} bytes, its envelope "
                                     f"says {size}")
                return _new_unpacked((data[start:end], [], check_digest))
            verified = check_digest
        elif version == _OLD_VERSION and not digest_required:
            _, _, codec, count = _OLD_HEADER.unpack_from(data)
            start, end, size, verified = _OLD_HEADER.size, len(data), None, False
        else:
            raise ValueError(f"an envelope of version {version} (this pstore reads "
                             f"{_VERSION}{'' if digest_required else f' and {_OLD_VERSION}'})")
        if codec not in blobio.CODEC_NAMES:
            raise ValueError(f"payload codec {codec} is unknown")
        if count * _BLOB.size > end - start:
            raise ValueError(f"the envelope lists {count} blobs, more than its bytes hold")
        blobs = []
        for _ in range(count):
            form, blob_size, digest = _BLOB.unpack_from(data, start)
            start += _BLOB.size
            blob_codec = form & 0x0F
            if blob_codec not in blobio.CODEC_NAMES:
                raise ValueError(f"blob codec {blob_codec} is unknown")
            blobs.append(BlobRef(name_of_digest(form >> 4, digest), blob_size, blob_codec))
        payload = data[start:end]
        if codec:
            limit = max_size if size is None else size
            if limit > max_size:
                raise ValueError(f"the payload declares {size} bytes, more than the store's "
                                 f"max_record_size ({max_size})")
            payload = blobio.decompress(codec, payload, limit)
        if size is not None and len(payload) != size:
            raise ValueError(f"the payload is {len(payload)} bytes, its envelope says {size}")
        return _new_unpacked((payload, blobs, verified))
    except (struct.error, IndexError) as error:
        raise ValueError(f"a truncated envelope ({error})") from None
