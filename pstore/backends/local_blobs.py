"""The blob methods of the backends whose blobs are files on this machine (SQLite, DBM).

Their blobs are the files of a :class:`~.blobs.BlobStore` in the folder ``<path>.blobs``.
The store and its module are made at the first operation that needs them: a store whose
records have no blobs (most caches of small values) never imports the module, and its
first open is a millisecond shorter.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ..errors import ClosedError, CorruptionError, FormatError

if TYPE_CHECKING:
    from .blobs import BlobStore, OddEntry

__all__ = ["LocalBlobs"]


class LocalBlobs:
    """The blob methods of :class:`~pstore.backends.base.Backend`, and the calls the
    backend makes at the ends of its transactions (:meth:`_settle_blobs`,
    :meth:`_end_blobs`) and at its close (:meth:`_close_blobs`)."""

    path: str
    _blob_store: BlobStore | None = None
    _blobs_closed = False

    def put_blob(self, chunks: Iterable[Any]) -> str:
        blobs = self._open_blobs()
        try:
            return blobs.put(chunks)
        except CorruptionError as error:
            raise CorruptionError(self.path, error.what) from None

    def get_blob(self, name: str, size: int, *, writable: bool) -> Any:
        blobs = self._open_blobs()
        try:
            return blobs.open(name, size, writable=writable)
        except FileNotFoundError:
            raise self._missing(name) from None
        except CorruptionError as error:    # a ValueError too: first
            raise CorruptionError(self.path, error.what) from None
        except ValueError as error:
            raise FormatError(self.path, str(error)) from None

    def read_blob(self, name: str) -> Iterator[bytes]:
        blobs = self._open_blobs()
        try:
            yield from blobs.read_chunks(name)
        except FileNotFoundError:
            raise self._missing(name) from None
        except CorruptionError as error:
            raise CorruptionError(self.path, error.what) from None

    def verify_blob(self, name: str) -> str | None:
        """Re-hash blob ``name``: None if its content matches its name, else what is wrong."""
        return self._open_blobs().verify(name)

    def odd_blob_entries(self) -> list[OddEntry]:
        """The entries of the blob folder that are not blobs (left alone by pstore)."""
        return self._open_blobs().odd_entries()

    def has_blob(self, name: str, size: int) -> bool:
        # A regular blob file of that name and size (links and odd entries are not blobs).
        try:
            fd = self._open_blobs()._open_blob(name)
        except (OSError, CorruptionError):
            return False
        try:
            return os.fstat(fd).st_size == size
        finally:
            os.close(fd)

    def collect_blobs(self, referenced: Collection[str]) -> None:
        self._open_blobs().collect(referenced)

    def _blob_usage(self) -> tuple[int, int]:
        """(number of blobs, their bytes on disk)."""
        return self._open_blobs().usage()

    def _settle_blobs(self) -> None:
        """Before a commit: the blobs its records name are made durable first."""
        if self._blob_store is not None:
            self._blob_store.settle()

    def _end_blobs(self, committed: bool) -> None:
        """At the end of a transaction, still under the write lock (see BlobStore.end)."""
        if self._blob_store is not None:
            self._blob_store.end(committed)

    def _close_blobs(self) -> None:
        """With the backend: the blob methods then raise ClosedError."""
        self._blobs_closed = True

    def _open_blobs(self) -> BlobStore:
        if self._blobs_closed:
            raise ClosedError(self.path)
        if self._blob_store is None:
            from .blobs import BlobStore
            self._blob_store = BlobStore(self.path + ".blobs")
        return self._blob_store

    def _missing(self, name: str) -> FormatError:
        return FormatError(self.path, f"blob file {self._open_blobs().path_of(name)} is missing")
