"""The redo journal that makes a DBM backend's commits atomic.

A journal is one file holding every change of one transaction, written before
any of them reaches the database. Its layout (also in ``docs/format.md``)::

    MAGIC
    entry*      entry = op (1 byte: 1 put, 0 delete) | key length | value length
                        (big-endian u32 each) | key | value (empty for a delete)
    TRAILER     b"END" | number of entries (big-endian u64) | SHA-256 of all the bytes before it
                (the trailer's first 11 bytes included)

A journal is written under a random name and renamed into place once whole:
the file at the journal's path is always complete, and its rename is the commit
point. Replaying it (every put and delete, in any order, any number of times)
yields the transaction's result. A file there that fails its checks (digest,
bounds, owner) is damaged, never a transaction that did not commit: it is moved
aside (see :func:`move_aside`), not deleted.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
import time
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping

from ..errors import CorruptionError, UnsafeFileError
from .files import fsync_directory, owned_by, replace_file

__all__ = ["DAMAGED_INFIX", "Changes", "PendingJournal", "move_aside", "read", "remove", "write"]

MAGIC = b"pstore-journal 1\n"
_ENTRY = struct.Struct(">BII")
_COUNT = struct.Struct(">3sQ")     # b"END", number of entries; then the digest
_DIGEST_SIZE = 32
_END = b"END"
#: What a journal moved aside is renamed to: its path + this + a time and a random part.
DAMAGED_INFIX = ".damaged-"

#: What a journal holds: DBM key -> new value, or None to delete the key.
Changes = Mapping[bytes, "bytes | None"]


def _encode(changes: Changes) -> Iterator[bytes]:
    digest = hashlib.sha256(MAGIC)
    yield MAGIC
    for key, value in changes.items():
        header = _ENTRY.pack(value is not None, len(key), 0 if value is None else len(value))
        for part in (header, key, value or b""):
            digest.update(part)
            yield part
    count = _COUNT.pack(_END, len(changes))
    digest.update(count)
    yield count + digest.digest()


def write(path: str, changes: Changes, *, fsync: bool) -> None:
    """Write ``changes`` as a complete journal at ``path`` (mode 0600), atomically.

    Written under a random name and renamed into place (never through a link). With
    ``fsync``, the journal and its directory entry are on disk when this returns.
    """
    replace_file(path, _encode(changes), fsync=fsync)


def read(path: str, owner: int | None) -> dict[bytes, bytes | None] | None:
    """The changes of the journal at ``path``, or None if there is none.

    Raises :class:`~pstore.errors.CorruptionError` naming the journal if it fails a
    check: not a regular file, not owned by ``owner`` (the store's owner; None: any),
    a digest that does not match, an entry that overruns the body, a count that
    differs from the trailer's.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CorruptionError(path, "the journal is a symbolic link") from None
        raise
    with open(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CorruptionError(path, "the journal is not a regular file")
        if not owned_by(info, owner):
            raise CorruptionError(path, f"the journal is owned by uid {info.st_uid}, "
                                        f"the store by uid {owner}")
        content = file.read()
    return _decode(path, content)


def _decode(path: str, content: bytes) -> dict[bytes, bytes | None]:
    def damaged(what: str) -> CorruptionError:
        return CorruptionError(path, f"journal of {len(content)} bytes: {what}")

    digest_start = len(content) - _DIGEST_SIZE
    body_end = digest_start - _COUNT.size
    if body_end < len(MAGIC) or not content.startswith(MAGIC):
        raise damaged("no journal header and trailer")
    if hashlib.sha256(memoryview(content)[:digest_start]).digest() != content[digest_start:]:
        raise damaged("its SHA-256 digest does not match")
    end, count = _COUNT.unpack_from(content, body_end)
    if end != _END:
        raise damaged(f"no END mark at offset {body_end}")
    changes: dict[bytes, bytes | None] = {}
    position = len(MAGIC)
    while position < body_end:
        if position + _ENTRY.size > body_end:
            raise damaged(f"the entry header at offset {position} overruns the body")
        op, key_length, value_length = _ENTRY.unpack_from(content, position)
        start = position + _ENTRY.size
        position = start + key_length + value_length
        if op not in (0, 1) or (op == 0 and value_length):
            raise damaged(f"the entry at offset {start - _ENTRY.size} has operation {op} "
                          f"with a {value_length}-byte value")
        if position > body_end:
            raise damaged(f"the entry at offset {start - _ENTRY.size} overruns the body "
                          f"(ends at {position}, the body at {body_end})")
        key = content[start:start + key_length]
        changes[key] = content[start + key_length:position] if op else None
    if len(changes) != count:
        raise damaged(f"{len(changes)} distinct entries, its trailer says {count}")
    return changes


def move_aside(path: str, *, fsync: bool) -> str:
    """Rename the damaged journal at ``path`` out of the way (kept for inspection, not
    deleted); return its new name. The rename moves a link itself, never its target."""
    target = (f"{path}{DAMAGED_INFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-"
              f"{os.urandom(4).hex()}")
    try:
        os.rename(path, target)
    except OSError as error:
        raise UnsafeFileError(path, f"a damaged journal that cannot be moved aside ({error})") \
            from error
    if fsync:
        fsync_directory(path)
    return target


def remove(path: str, *, fsync: bool) -> None:
    """Delete the journal at ``path`` if there is one."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    if fsync:
        fsync_directory(path)


class PendingJournal:
    """The journal file of one store: found, checked, read as an overlay, moved aside.

    ``validate(changes)`` is the backend's own check of a journal's content (raising
    :class:`~pstore.errors.CorruptionError`), run after :func:`read`'s. Every journal
    that fails a check is reported once with a ``RuntimeWarning`` and listed by
    :meth:`problems`.
    """

    def __init__(self, path: str, owner: int, validate: Callable[[Changes], None]) -> None:
        self.path = path
        self._owner = owner
        self._validate = validate
        self._problems: list[str] = []
        self._overlay: dict[bytes, bytes | None] = {}
        self._overlay_of: tuple[int, int, int] | None = None  # the file it was read from

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def read(self) -> dict[bytes, bytes | None] | None:
        """The journal's changes, checked (see the class); None if there is none."""
        changes = read(self.path, self._owner)
        if changes is not None:
            self._validate(changes)
        return changes

    def overlay(self) -> tuple[dict[bytes, bytes | None], Hashable]:
        """``(changes, identity)`` of the journal there is, for a reader that may not apply
        it: ``({}, None)`` if there is none, ``({}, identity)`` if it fails its checks
        (reported). Read again only when the file changed."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            self._overlay, self._overlay_of = {}, None
            return self._overlay, None
        identity = (info.st_ino, info.st_size, info.st_mtime_ns)
        if identity != self._overlay_of:
            try:
                self._overlay = self.read() or {}
            except CorruptionError as error:
                self._overlay = {}
                self.report(f"{error} (ignored by this read-only store; the next writer "
                            f"moves it aside)")
            self._overlay_of = identity
        return self._overlay, identity

    def set_aside(self, error: CorruptionError, *, fsync: bool) -> None:
        """Move the journal that failed its check with ``error`` aside, and report it."""
        kept = move_aside(self.path, fsync=fsync)
        self.report(f"{error}; moved aside, unapplied, to {kept!r}")

    def report(self, problem: str) -> None:
        if problem not in self._problems:
            self._problems.append(problem)
            warnings.warn(problem, RuntimeWarning, stacklevel=5)

    def problems(self) -> list[str]:
        """The journals that failed their check: this object's, and every one moved aside
        before (by any process), which are kept beside the store."""
        folder = os.path.dirname(os.path.abspath(self.path))
        prefix = os.path.basename(self.path) + DAMAGED_INFIX
        kept = [f"a damaged journal was kept as {os.path.join(folder, name)!r}"
                for name in sorted(os.listdir(folder)) if name.startswith(prefix)]
        return [*self._problems, *(problem for problem in kept if problem not in self._problems)]
