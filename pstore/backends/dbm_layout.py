"""The key space of a pstore DBM database: which DBM key holds what, and how values are packed.

Described in prose in ``docs/format.md``; used by :mod:`.dbm`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Collection

from ..errors import CorruptionError

__all__ = [
    "CHECK",
    "CHECKED_META",
    "DIGESTS_FROM",
    "FORMAT",
    "FORMAT_KEY",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FREE_PAGES",
    "KEY_COUNT",
    "MAX_OID",
    "NEXT_OID",
    "OPEN_PAGE",
    "PAGE_COUNT",
    "PAGE_KEYS",
    "VERSION",
    "blobs_key",
    "count_key",
    "encode_key",
    "key_key",
    "lazy_key",
    "pack_ints",
    "pack_names",
    "pack_page",
    "page_key",
    "PAGE_SEAL_SIZE",
    "record_key",
    "refs_key",
    "unpack_ints",
    "unpack_names",
    "unpack_page", "meta_digest", "check_meta",
]

#: The key that marks a pstore DBM store, and what it holds.
FORMAT_KEY = b"m:format"
FORMAT_NAME = b"pstore-dbm"
#: The newest format version this code reads and the one it writes. Version 1 databases
#: become version 2 when opened for writing: version 2 added lazy refs (``l:<oid>``),
#: records of Persistent objects and blobs (``b:<oid>``), which version 1 code would misread.
#: Version 3 added record digests and the seal of each key binding; ``m:digests_from``
#: is the first object id whose record has a digest (an upgraded store's older ones may not).
#: Version 4 names new blobs by BLAKE3 (older blobs keep their BLAKE2b names).
#: Version 5 signs records (envelope version 3) and records the key's fingerprint.
FORMAT_VERSION = 5

# Meta keys (docs/format.md).
FORMAT = FORMAT_KEY
VERSION = b"m:version"
NEXT_OID = b"m:next_oid"
KEY_COUNT = b"m:keys"
PAGE_COUNT = b"m:pages"
OPEN_PAGE = b"m:open_page"
FREE_PAGES = b"m:free_pages"
DIGESTS_FROM = b"m:digests_from"
#: ``<tally or -> <SHA-256 of the other meta keys>``, written by every commit; the tally
#: (dbm.dumb only) is ``<entries>/<sum of their keys' CRC-32s, hex>``.
CHECK = b"m:check"
CHECKED_META = (FORMAT, VERSION, NEXT_OID, KEY_COUNT, PAGE_COUNT, OPEN_PAGE, FREE_PAGES,
                DIGESTS_FROM)


#: At most this many keys per key page: binding a new key rewrites one page.
PAGE_KEYS = 256
_LENGTH = struct.Struct(">I")
#: Object ids are signed 64-bit integers (as SQLite's).
MAX_OID = 2 ** 63 - 1


def record_key(oid: int) -> bytes:
    return b"r:%d" % oid


def refs_key(oid: int) -> bytes:
    return b"f:%d" % oid


def blobs_key(oid: int) -> bytes:
    return b"b:%d" % oid


def lazy_key(oid: int) -> bytes:
    return b"l:%d" % oid


def count_key(oid: int) -> bytes:
    return b"c:%d" % oid


def key_key(key: str) -> bytes:
    return b"k:" + encode_key(key)


def page_key(number: int) -> bytes:
    return b"p:%d" % number


def encode_key(key: str) -> bytes:
    # surrogatepass: any str is a valid key, as it is for the SQLite backend.
    return key.encode("utf-8", "surrogatepass")


def pack_ints(values: Collection[int]) -> bytes:
    return struct.pack(f"<{len(values)}q", *values)


def unpack_ints(data: bytes | None) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 8}q", data)) if data else []


def pack_names(names: Collection[str]) -> bytes | None:
    return ",".join(sorted(set(names))).encode("ascii") or None


def unpack_names(data: bytes | None) -> list[str]:
    return data.decode("ascii").split(",") if data else []


#: Bytes of a key page's seal (format version 5).
PAGE_SEAL_SIZE = 8


def _page_seal(number: int, content: bytes) -> bytes:
    """The seal of page ``number`` holding ``content``: BLAKE2b-64 (person ``pstore-page``,
    salt the page number), so a damaged page, or one moved to another number, fails it."""
    return hashlib.blake2b(content, digest_size=PAGE_SEAL_SIZE, person=b"pstore-page",
                           salt=number.to_bytes(8, "little")).digest()


def pack_page(keys: list[bytes], number: int) -> bytes:
    content = b"".join(_LENGTH.pack(len(key)) + key for key in keys)
    return content + _page_seal(number, content)


def unpack_page(data: bytes | None, number: int, *, sealed: bool = True) -> list[bytes]:
    """The keys of page ``number`` whose value is ``data`` (None: an empty page);
    ``sealed``: the page ends in its seal (format version 5), checked first. Raises
    ``ValueError`` saying what is wrong with a damaged page."""
    if not data:
        return []
    if sealed:
        content = data[:-PAGE_SEAL_SIZE]
        if len(data) < PAGE_SEAL_SIZE or data[-PAGE_SEAL_SIZE:] != _page_seal(number, content):
            raise ValueError(f"key page {number} does not match its seal")
        data = content
    keys = []
    position = 0
    while position < len(data):
        (length,) = _LENGTH.unpack_from(data, position)
        position += _LENGTH.size
        if position + length > len(data):
            raise ValueError(f"key page {number} lists a key past its end")
        keys.append(data[position:position + length])
        position += length
    return keys


def meta_digest(get: Callable[[bytes], bytes | None]) -> bytes:
    """The SHA-256 (hex) of the meta keys' values, each read by ``get``: what ``m:check``
    holds after the entry count."""
    digest = hashlib.sha256()
    for key in CHECKED_META:
        value = get(key)
        digest.update(b"-" if value is None else b"%d:%s" % (len(value), value))
    return digest.hexdigest().encode("ascii")


def check_meta(path: str, get: Callable[[bytes], bytes | None], tally: bytes | None,
               module: str) -> None:
    """Raise CorruptionError naming ``path`` unless the meta keys (read by ``get``) match
    ``m:check`` and, if the database's ``tally`` is known, it is the one recorded (a
    tally written before keys were summed, a bare count, is compared as a count).

    Stores written before ``m:check`` existed lack it; it is checked when present.
    """
    next_oid = get(NEXT_OID)
    if next_oid is not None and not (next_oid.isdigit() and 0 < int(next_oid) <= MAX_OID):
        raise CorruptionError(path, f"meta key m:next_oid holds {next_oid[:40]!r}")
    stored = get(CHECK)
    if stored is None:
        return
    count, _, digest = stored.partition(b" ")
    if digest != meta_digest(get):
        raise CorruptionError(path, "the meta keys do not match their digest in m:check "
                                    "(a damaged index or database)")
    if tally is None or count == tally or (b"/" not in count and tally.startswith(count + b"/")):
        return
    found, _, keys = tally.partition(b"/")
    recorded = count.partition(b"/")[0]
    what = f"{found.decode()} entries" if found != recorded else \
        f"entries whose keys do not sum to the recorded checksum ({keys.decode()})"
    raise CorruptionError(path, f"the database holds {what}, its meta key m:check says "
                                f"{count[:40].decode('latin-1')} (a truncated or damaged "
                                f"{module} index: an entry lost or renamed)")

