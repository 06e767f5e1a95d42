"""The redo journal that makes a DBM backend's commits atomic.

A journal is one file holding every change of one transaction, written before
any of them reaches the database. Its layout (also in ``docs/format.md``)::

    MAGIC
    entry*      entry = op (1 byte: 1 put, 0 delete) | key length | value length
                        (big-endian u32 each) | key | value (empty for a delete)
    TRAILER     b"END" | number of entries (big-endian u64) | SHA-256 of all the bytes before it
                (the trailer's first 11 bytes included)

A file whose trailer is missing or whose digest does not match is
*incomplete*: its writer died before the commit point, and it is discarded.
A complete journal is the commit point itself: replaying it (every put and
delete, in any order, any number of times) yields the transaction's result.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping

from .files import fsync_directory

__all__ = ["read", "remove", "write"]

MAGIC = b"pstore-journal 1\n"
_ENTRY = struct.Struct(">BII")
_COUNT = struct.Struct(">3sQ")     # b"END", number of entries; then the digest
_DIGEST_SIZE = 32
_END = b"END"

#: What a journal holds: DBM key -> new value, or None to delete the key.
Changes = Mapping[bytes, "bytes | None"]


def write(path: str, changes: Changes, *, fsync: bool) -> None:
    """Write ``changes`` as a complete journal at ``path`` (mode 0600), replacing any file there.

    With ``fsync``, the journal and its directory entry are on disk when this returns.
    """
    digest = hashlib.sha256(MAGIC)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as file:
        file.write(MAGIC)
        for key, value in changes.items():
            header = _ENTRY.pack(value is not None, len(key), 0 if value is None else len(value))
            for part in (header, key, value or b""):
                digest.update(part)
                file.write(part)
        count = _COUNT.pack(_END, len(changes))
        digest.update(count)
        file.write(count + digest.digest())
        file.flush()
        if fsync:
            os.fsync(file.fileno())
    if fsync:
        fsync_directory(path)


def read(path: str) -> dict[bytes, bytes | None] | None:
    """The changes of the journal at ``path``, or None if there is none or it is incomplete."""
    try:
        with open(path, "rb") as file:
            content = file.read()
    except FileNotFoundError:
        return None
    digest_start = len(content) - _DIGEST_SIZE
    body_end = digest_start - _COUNT.size
    if body_end < len(MAGIC) or not content.startswith(MAGIC):
        return None
    if hashlib.sha256(memoryview(content)[:digest_start]).digest() != content[digest_start:]:
        return None
    end, count = _COUNT.unpack_from(content, body_end)
    if end != _END:
        return None
    changes: dict[bytes, bytes | None] = {}
    position = len(MAGIC)
    while position < body_end:
        is_put, key_length, value_length = _ENTRY.unpack_from(content, position)
        position += _ENTRY.size
        key = content[position:position + key_length]
        position += key_length
        changes[key] = content[position:position + value_length] if is_put else None
        position += value_length
    if len(changes) != count:   # the digest matched, so only a bug in write() gets here
        raise ValueError(f"journal {path!r} holds {len(changes)} entries, its trailer {count}")
    return changes


def remove(path: str, *, fsync: bool) -> None:
    """Delete the journal at ``path`` if there is one."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    if fsync:
        fsync_directory(path)
