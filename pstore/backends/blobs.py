"""Content-addressed blob files: the out-of-band buffers of records (large arrays).

A :class:`BlobStore` keeps blobs as files in one directory, each named by the
digest of its bytes (:func:`blob_digest`), so equal bytes are stored once. A
blob is written to a temporary file, fsynced, then renamed to its name: a blob
file that has its name is complete and durable, whatever happens to the
process or the machine afterwards. Blobs are mapped into memory to be read,
copy-on-write or read-only, so loading one costs nothing until its pages are
touched.

The backends that keep their data in local files (:mod:`.sqlite`, :mod:`.dbm`)
use this module; it knows nothing of records, keys or transactions.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import tempfile
import threading
from collections.abc import Collection, Iterable, Iterator
from typing import Any

from ..errors import FormatError
from .files import fsync_directory

__all__ = ["BlobStore", "LocalBlobs", "blob_digest", "LEAF_SIZE"]

#: The digest is a hash tree over leaves of this many bytes (the last one may be shorter).
LEAF_SIZE = 1 << 24
_DIGEST_SIZE = 32
_TEMP_PREFIX = ".tmp-"
# The data and the size, without the rest of the inode's metadata where the OS can.
_fdatasync = getattr(os, "fdatasync", os.fsync)
# mmap keeps a duplicate of the file descriptor unless told not to (Python 3.13+):
# without it, each loaded array would hold a descriptor open.
_MMAP_OPTIONS: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def _leaf_digest(data: Any) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE, person=b"pstore-leaf").digest()


def _root_digest(size: int, leaves: Iterable[bytes]) -> str:
    root = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=_DIGEST_SIZE,
                           person=b"pstore-blob")
    for leaf in leaves:
        root.update(leaf)
    return root.hexdigest()


def blob_digest(data: Any) -> str:
    """The name of a blob holding the bytes of buffer ``data``: 64 hex digits.

    BLAKE2b-256 (person ``pstore-blob``) of the size as 8 little-endian bytes
    followed by the BLAKE2b-256 digests (person ``pstore-leaf``) of the
    consecutive 16 MiB leaves. The leaves of a large blob are hashed in
    parallel while it is written. ``docs/format.md`` describes it.
    """
    view = memoryview(data).cast("B")
    return _root_digest(len(view), (_leaf_digest(view[start:start + LEAF_SIZE])
                                    for start in range(0, len(view) or 1, LEAF_SIZE)))


class _TreeHasher:
    """:func:`blob_digest` of a stream of chunks.

    A chunk that holds a whole leaf is hashed by a worker thread (hashlib releases
    the GIL) while the caller goes on writing; others are hashed piecewise in the
    calling thread. :meth:`add_worker` adds one more, for when the caller stops
    using its core (to wait for the disk). The threads live only until :meth:`digest`.
    """

    def __init__(self) -> None:
        self._size = 0
        self._leaves: list[bytes | None] = []       # digests, None while a worker hashes it
        self._queue: list[tuple[int, memoryview]] = []
        self._queue_lock = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._failure: BaseException | None = None
        self._partial: Any = None                   # hasher of a leaf arriving in pieces
        self._partial_size = 0

    def update(self, chunk: memoryview) -> None:
        self._size += len(chunk)
        start = 0
        while start < len(chunk):
            if self._partial is None and len(chunk) - start >= LEAF_SIZE:
                self._submit(chunk[start:start + LEAF_SIZE])
                start += LEAF_SIZE
                continue
            if self._partial is None:
                self._partial = hashlib.blake2b(digest_size=_DIGEST_SIZE, person=b"pstore-leaf")
                self._partial_size = 0
            piece = chunk[start:start + LEAF_SIZE - self._partial_size]
            self._partial.update(piece)
            self._partial_size += len(piece)
            start += len(piece)
            if self._partial_size == LEAF_SIZE:
                self._leaves.append(self._partial.digest())
                self._partial = None

    def _submit(self, leaf: memoryview) -> None:
        with self._queue_lock:
            self._queue.append((len(self._leaves), leaf))
            self._leaves.append(None)
            self._queue_lock.notify()
        if not self._threads:
            self.add_worker()

    def add_worker(self) -> None:
        """Start one more thread hashing the submitted leaves (none if none were)."""
        if self._queue:
            thread = threading.Thread(target=self._work, name="pstore-blob-hash", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while True:
            with self._queue_lock:
                while not self._queue and not self._closed:
                    self._queue_lock.wait()
                if not self._queue:
                    return
                index, leaf = self._queue.pop(0)
            try:
                self._leaves[index] = _leaf_digest(leaf)
            except BaseException as error:     # surfaced in the caller by digest()
                self._failure = error

    def close(self) -> None:
        """Let the workers finish what was submitted, and end them."""
        with self._queue_lock:
            self._closed = True
            self._queue_lock.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def digest(self) -> str:
        self.close()
        if self._failure is not None:
            raise self._failure
        if self._partial is not None or not self._leaves:
            self._leaves.append((self._partial or hashlib.blake2b(
                digest_size=_DIGEST_SIZE, person=b"pstore-leaf")).digest())
            self._partial = None
        return _root_digest(self._size, self._leaves)  # type: ignore[arg-type]


class BlobStore:
    """Blob files under ``directory``: ``directory/ab/abcdef...`` (two-digit fan-out).

    The directory is created (mode 0700) by the first :meth:`put`, never by a
    read. A writer must hold its store's write lock around :meth:`put`,
    :meth:`end` and :meth:`collect`: that is what makes a blob file found under
    its name safe to reuse.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._created: list[str] = []   # blobs the open transaction created
        self._doomed: set[str] = set()  # blobs to delete when the open transaction commits

    def path_of(self, name: str) -> str:
        """The file of blob ``name`` (which must be a digest: 64 hex digits)."""
        return os.path.join(self.directory, name[:2], name)

    def put(self, chunks: Iterable[Any]) -> str:
        """Write the concatenated buffers of ``chunks`` as a blob; return its name.

        When a blob of the same bytes exists already, the new copy is discarded.
        When this returns, the blob is durable (fsynced, and its directory entry
        too); if the transaction rolls back, :meth:`end` deletes it again.
        """
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self.directory)  # 0600
        hasher = _TreeHasher()
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                hasher.update(view)
                _write_all(fd, view)
            # Writing kept one core busy and a hashing thread the other; waiting for the
            # disk frees this one.
            hasher.add_worker()
            _fdatasync(fd)
            name = hasher.digest()
        except BaseException:
            hasher.close()
            os.close(fd)
            os.unlink(temporary)
            raise
        os.close(fd)
        target = self.path_of(name)
        if os.path.exists(target):
            os.unlink(temporary)
            return name
        fan_out = os.path.dirname(target)
        if not os.path.isdir(fan_out):
            os.mkdir(fan_out, 0o700)
            fsync_directory(fan_out)
        os.rename(temporary, target)
        fsync_directory(target)
        self._created.append(name)
        return name

    def open(self, name: str, size: int, *, writable: bool) -> Any:
        """The bytes of blob ``name``, mapped: a buffer of ``size`` bytes.

        ``writable``: a copy-on-write mapping (writes change this process's pages,
        never the file), else a read-only one. Raises ``FileNotFoundError`` if the
        blob is missing and ``ValueError`` if its size is not ``size``.
        """
        with open(self.path_of(name), "rb") as file:
            actual = os.fstat(file.fileno()).st_size
            if actual != size:
                raise ValueError(f"blob {self.path_of(name)} holds {actual} bytes, "
                                 f"its record says {size}")
            if size == 0:       # an empty file cannot be mapped
                return bytearray() if writable else b""
            access = mmap.ACCESS_COPY if writable else mmap.ACCESS_READ
            return mmap.mmap(file.fileno(), 0, access=access, **_MMAP_OPTIONS)

    def read_chunks(self, name: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The stored bytes of blob ``name``, a chunk at a time (for compressed blobs)."""
        with open(self.path_of(name), "rb") as file:
            while chunk := file.read(chunk_size):
                yield chunk

    def names(self) -> Iterator[str]:
        """The name of every blob, in no particular order."""
        try:
            fan_outs = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for fan_out in fan_outs:
            if len(fan_out) == 2:
                yield from os.listdir(os.path.join(self.directory, fan_out))

    def usage(self) -> tuple[int, int]:
        """(number of blobs, their bytes on disk)."""
        count = size = 0
        for name in self.names():
            count += 1
            size += os.lstat(self.path_of(name)).st_size
        return count, size

    def doom(self, names: Iterable[str]) -> None:
        """Delete the blobs ``names`` when the open transaction commits (see :meth:`end`)."""
        self._doomed.update(names)

    def end(self, committed: bool) -> None:
        """At the end of a transaction, before the write lock is released.

        On commit, delete the doomed blobs: no record refers to them, and none can
        start to before the lock is released. On rollback, delete the blobs the
        transaction created, so that it leaves nothing behind.
        """
        try:
            self._remove(self._doomed if committed else self._created)
        finally:
            self._created.clear()
            self._doomed.clear()

    def _remove(self, names: Iterable[str]) -> None:
        removed = None
        for name in names:
            removed = self.path_of(name)
            try:
                os.unlink(removed)
            except FileNotFoundError:
                pass
        if removed is not None:
            fsync_directory(removed)

    def collect(self, referenced: Collection[str]) -> int:
        """Doom every blob not in ``referenced``; return how many.

        Also deletes the temporary files of writers killed in the middle of
        :meth:`put` (the caller holds the write lock: no put is under way).
        """
        try:
            entries = os.listdir(self.directory)
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry.startswith(_TEMP_PREFIX):
                os.unlink(os.path.join(self.directory, entry))
        unreferenced = [name for name in self.names() if name not in referenced]
        self.doom(unreferenced)
        return len(unreferenced)


class LocalBlobs:
    """The blob methods of :class:`~pstore.backends.base.Backend` for backends whose
    blobs are the files of a :class:`BlobStore` (``self._blobs``) on this machine."""

    path: str
    _blobs: BlobStore

    def put_blob(self, chunks: Iterable[Any]) -> str:
        return self._blobs.put(chunks)

    def get_blob(self, name: str, size: int, *, writable: bool) -> Any:
        try:
            return self._blobs.open(name, size, writable=writable)
        except FileNotFoundError:
            raise self._missing(name) from None
        except ValueError as error:
            raise FormatError(self.path, str(error)) from None

    def read_blob(self, name: str) -> Iterator[bytes]:
        try:
            yield from self._blobs.read_chunks(name)
        except FileNotFoundError:
            raise self._missing(name) from None

    def _missing(self, name: str) -> FormatError:
        return FormatError(self.path, f"blob file {self._blobs.path_of(name)} is missing")


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]
