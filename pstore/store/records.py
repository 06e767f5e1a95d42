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
* a 40-byte trailer: the signer's key fingerprint (8 bytes; zeros: unsigned), a
  16-byte digest of everything before it (unkeyed BLAKE2b: damage detection that
  needs no key) and a 16-byte MAC of everything before it, digest included (BLAKE2b
  keyed with the signer's key; zeros: unsigned). The salt of both holds the object id and the format
  version, so a record moved to another id or read as another version fails them.

A record whose fingerprint is the reader's is checked by its MAC alone (which
also detects damage); any other by its digest, and reported not ``signed``.

Stores of format version 2 hold records without a digest -- a plain pickle, or
an envelope of version 1 (no payload size, no digest) -- which :func:`unpack`
still reads when told they may be there.

Codecs: 0 none, 1 zlib, 2 lzma, 3 zstd. This module only encodes and decodes bytes;
blob I/O and compression are in :mod:`.blobio`.
"""

from __future__ import annotations

import struct

# hmac.compare_digest itself: hmac would import hashlib's OpenSSL at ``import pstore``.
from _operator import _compare_digest as compare_digest
from collections.abc import Callable
from typing import NamedTuple

from .._blake2 import digest_of, open_envelope, seal_plain
from ..blob_names import digest_of_name, name_of_digest
from . import blobio
from .blobio import CODECS, BlobRef
from .signing import FINGERPRINT_SIZE, MAC_SIZE, Signer

__all__ = ["BlobRef", "CODECS", "DIGEST_FORMAT_VERSION", "DIGEST_SIZE", "ENVELOPE",
           "MAC_SIZE", "TRAILER_SIZE", "IntegrityMismatch", "Unpacked", "pack", "resign", "seal",
           "sign", "unpack"]

#: The first byte of an envelope; a record starting with any other byte is a plain
#: pickle (format version 2 only).
ENVELOPE = b"\xff"
#: The store format version the digest covers (and the first that has one).
DIGEST_FORMAT_VERSION = 3
#: Bytes of a record's digest.
DIGEST_SIZE = 16
#: Bytes after an envelope's payload: fingerprint, digest, MAC.
TRAILER_SIZE = FINGERPRINT_SIZE + DIGEST_SIZE + MAC_SIZE
_UNSIGNED = bytes(FINGERPRINT_SIZE)
_NO_MAC = bytes(MAC_SIZE)
# The envelope's own version: 3 ends in the signed trailer; 2 (format versions 3 and 4
# before signing) in the 16-byte digest alone; 1 (format version 2) in nothing.
_VERSION = 3
_DIGEST_VERSION = 2
_OLD_VERSION = 1
_HEADER = struct.Struct("<BBBIQ")   # ENVELOPE, version, payload codec, blobs, payload size
_OLD_HEADER = struct.Struct("<BBBI")    # envelope version 1: no payload size
_BLOB = struct.Struct("<BQ32s")     # codec | naming << 4, buffer size, digest
_SALT = struct.Struct("<QB")        # object id, format version (BLAKE2b pads the salt)
_PERSON = b"pstore-record"
_MAC_PERSON = b"pstore-mac"
#: Payloads shorter than this are not worth compressing.
_COMPRESS_MIN = 512


class Unpacked(NamedTuple):
    """What :func:`unpack` found in a record."""

    payload: bytes          # the pickle(s), decompressed
    blobs: list[BlobRef]    # the out-of-band buffers, in order
    verified: bool          # whether a digest or MAC vouched for these bytes (False: format 2)
    signed: bool = False    # whether a MAC under the reader's key did


class IntegrityMismatch(ValueError):
    """A record's digest or MAC does not match its bytes: they changed after it was written."""


_unpack_header = _HEADER.unpack_from


def _new_unpacked(fields: tuple[bytes, list[BlobRef], bool, bool]) -> Unpacked:
    return tuple.__new__(Unpacked, fields)


def _digest(oid: int, parts: tuple[memoryview | bytes, ...], key: bytes = b"",
            person: bytes = _PERSON) -> bytes:
    """The 16-byte BLAKE2b of ``parts`` joined, salted with record id ``oid``: its digest,
    or keyed with a signer's MAC key (and ``person`` ``_MAC_PERSON``) its MAC."""
    return digest_of(parts, DIGEST_SIZE, key, _SALT.pack(oid, DIGEST_FORMAT_VERSION), person)


def _trailer(oid: int, parts: tuple[memoryview | bytes, ...], signer: Signer | None) -> bytes:
    """The trailer of a record whose bytes before it are ``parts`` (joined), minus the
    fingerprint, which is hashed too: each part is hashed once, not copied."""
    fingerprint = _UNSIGNED if signer is None else signer.fingerprint
    checked = fingerprint + _digest(oid, (*parts, fingerprint))
    if signer is None:
        return checked + _NO_MAC
    return checked + _digest(oid, (*parts, checked), signer.mac_key, _MAC_PERSON)


def seal(oid: int, body: bytes, signer: Signer | None = None) -> bytes:
    """``body`` (an envelope's header and payload) with its trailer: the record of object id
    ``oid``, signed by ``signer`` (None: unsigned, as another key's records look to it)."""
    return body + _trailer(oid, (body,), signer)


def _pack_blob(blob: BlobRef) -> bytes:
    found = digest_of_name(blob.name)
    if found is None:
        raise ValueError(f"{blob.name!r} is not a blob name")
    naming, digest = found
    return _BLOB.pack(blob.codec | naming << 4, blob.size, digest)


def pack(oid: int, payload: bytes, blobs: list[BlobRef], codec: int,
         signer: Signer | None = None) -> bytes:
    """The record of object id ``oid``: ``payload`` with out-of-band ``blobs``, compressed
    with ``codec`` when that makes it smaller, signed by ``signer`` (None: unsigned)."""
    size = len(payload)
    if seal_plain is not None and not blobs and (not codec or size < _COMPRESS_MIN) \
            and type(payload) is bytes:
        # The common record, in one C call: the same bytes as below.
        return seal_plain(payload, oid, None, b"") if signer is None else \
            seal_plain(payload, oid, signer.fingerprint, signer.mac_key)
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
    # Hashed apart: a large payload is copied once (by the join), not twice.
    return b"".join([header, payload, _trailer(oid, (header, payload), signer)])


def sign(data: bytes, oid: int, signer: Signer, *, digest_required: bool = True,
         max_size: int = 1 << 30) -> bytes:
    """Record ``oid`` (bytes ``data``) signed by ``signer``: its digest (if it has one) is
    checked first, then its trailer replaced; a record of format version 2 becomes an
    envelope (uncompressed). Raises what :func:`unpack` raises."""
    return resign(data, oid, unpack(data, oid, digest_required=digest_required,
                                    max_size=max_size), signer)


def resign(data: bytes, oid: int, unpacked: Unpacked, signer: Signer) -> bytes:
    """Record ``oid`` (bytes ``data``, which :func:`unpack` read as ``unpacked``: checked
    already) signed by ``signer`` (see :func:`sign`)."""
    if data[:1] == ENVELOPE and data[1] == _VERSION:
        return seal(oid, data[:len(data) - TRAILER_SIZE], signer)
    if data[:1] == ENVELOPE and data[1] == _DIGEST_VERSION:
        body = bytearray(data[:len(data) - DIGEST_SIZE])
        body[1] = _VERSION
        return seal(oid, bytes(body), signer)
    return pack(oid, unpacked.payload, unpacked.blobs, 0, signer)


def common_opener(signer: Signer) -> Callable[[bytes, int], tuple[bytes, bool] | None] | None:
    """The first step of :func:`unpack` for a reader with ``signer``, as one function of
    ``(data, oid)``: the common record's ``(payload, signed)`` -- version 3, no codec, no
    blobs, every check passing, so verified -- else None (then :func:`unpack` reads the
    record and says what is wrong). None where the C reading is not built."""
    if open_envelope is None:
        return None
    fingerprint, mac_key = signer.fingerprint, signer.mac_key

    def open_common(data: bytes, oid: int) -> tuple[bytes, bool] | None:
        return open_envelope(data, oid, fingerprint, mac_key)

    return open_common


def unpack(data: bytes, oid: int, *, signer: Signer | None = None,
           digest_required: bool = True, max_size: int = 1 << 30,
           check_digest: bool = True) -> Unpacked:
    """The payload, blobs and verification of record ``oid`` whose bytes are ``data``.

    A record whose fingerprint is ``signer``'s is checked by its MAC under that key
    (then it is ``signed``), any other by its digest. ``digest_required``: False only
    where the record may predate format version 3 (then a plain pickle or a version 1
    envelope is read unverified). ``check_digest``: False for tools that look at a
    record's bytes without loading them (``pstore ls``, ``dis``): neither digest nor
    MAC is compared, and the result is never ``verified``. A payload larger than it
    declares, or than ``max_size``, is not decompressed past that. Raises
    :class:`IntegrityMismatch` for a failed digest or MAC, ``ValueError`` saying what
    is wrong otherwise, before any payload byte is trusted.
    """
    if open_envelope is not None and check_digest:
        # The common record (version 3, no codec, no blobs, every check passing) in one C
        # call; every other, and every failure, is read again below, which says why.
        opened = open_envelope(data, oid, None, b"") if signer is None else \
            open_envelope(data, oid, signer.fingerprint, signer.mac_key)
        if opened is not None:
            return _new_unpacked((opened[0], [], True, opened[1]))
    if data[:1] != ENVELOPE:
        if digest_required:
            raise ValueError("the record has no envelope (so no digest)")
        return Unpacked(data, [], False)
    try:
        version = data[1]
        if version == _VERSION or version == _DIGEST_VERSION:
            _, _, codec, count, size = _unpack_header(data)
            start = _HEADER.size
            end = len(data) - (TRAILER_SIZE if version == _VERSION else DIGEST_SIZE)
            if end < start:
                raise ValueError(f"the record is {len(data)} bytes, shorter than its header "
                                 f"and trailer")
            signed = False
            if check_digest:
                if version == _VERSION:
                    signed = _check(data, oid, end, signer)
                elif data[end:] != _digest(oid, (data[:end],)):
                    raise IntegrityMismatch("the record's digest does not match its bytes")
            if not (codec or count):    # the common case: a small plain record
                if end - start != size:
                    raise ValueError(f"the payload is {end - start} bytes, its envelope "
                                     f"says {size}")
                return _new_unpacked((data[start:end], [], check_digest, signed))
            verified = check_digest
        elif version == _OLD_VERSION and not digest_required:
            _, _, codec, count = _OLD_HEADER.unpack_from(data)
            start, end, size, verified, signed = _OLD_HEADER.size, len(data), None, False, False
        else:
            raise ValueError(f"an envelope of version {version} (this pstore reads "
                             f"{_DIGEST_VERSION}, {_VERSION}"
                             f"{'' if digest_required else f' and {_OLD_VERSION}'})")
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
        return _new_unpacked((payload, blobs, verified, signed))
    except (struct.error, IndexError) as error:
        raise ValueError(f"a truncated envelope ({error})") from None


def _check(data: bytes, oid: int, end: int, signer: Signer | None) -> bool:
    """Check the trailer of envelope ``data`` (its payload ends at ``end``): True if its MAC
    verified under ``signer``'s key, False if its digest did (another signer, or none)."""
    fingerprint = data[end:end + FINGERPRINT_SIZE]
    mac_start = end + FINGERPRINT_SIZE + DIGEST_SIZE
    if signer is not None and fingerprint == signer.fingerprint:
        # A small record is cheaper to slice than to view.
        covered = data[:mac_start] if end < 4096 else memoryview(data)[:mac_start]
        mac = _digest(oid, (covered,), signer.mac_key, _MAC_PERSON)
        if not compare_digest(data[mac_start:], mac):
            raise IntegrityMismatch("the record's MAC does not verify under this store's key, "
                                    "whose fingerprint it carries: its bytes changed after "
                                    "it was written")
        return True
    body = data[:end + FINGERPRINT_SIZE] if end < 4096 else \
        memoryview(data)[:end + FINGERPRINT_SIZE]
    if data[end + FINGERPRINT_SIZE:mac_start] != _digest(oid, (body,)):
        raise IntegrityMismatch("the record's digest does not match its bytes")
    return False
