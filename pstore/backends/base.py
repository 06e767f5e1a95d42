"""The interface between :mod:`pstore.store` and the storage underneath it.

A backend stores three things, as bytes, integers and names only; it knows
nothing of pickling:

* **records**: ``object id -> (data, refs, blobs)``, where ``data`` is the
  record's bytes, ``refs`` the object ids those bytes refer to -- some of them
  marked *lazy*: references that loading the record does not follow at once --
  and ``blobs`` the names of the blobs they use (refs and blobs kept so that the
  backend can find unreachable records and blobs on its own);
* **blobs**: large byte strings (arrays' buffers), written once and named by
  their content, so equal bytes are kept once; read back mapped into memory
  where the backend can;
* **keys**: ``str -> object id`` bindings.

Every method that changes something must be called inside a write transaction
(:meth:`Backend.begin` ... :meth:`Backend.commit` or :meth:`Backend.rollback`).
Reads may be called inside or outside one. Outside, each read sees the latest
committed state; inside, every read (records, keys, iteration, counts, refs)
sees the transaction's own changes too -- the store relies on it, e.g. to read
back a key it has just bound, or to delete keys while iterating.

A backend is used by one :class:`~pstore.store.Store` from one thread at a time
(the store serializes its threads); it may assume nothing of the caller beyond
that. It may assume no local file beyond its own code: a server database can
implement the same methods.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Collection, Hashable, Iterable, Iterator
from typing import Any

from ..errors import Error, FormatError

__all__ = ["Backend", "binding_seal", "SEAL_SIZE"]

#: Bytes of a key binding's seal.
SEAL_SIZE = 8


def binding_seal(key: str, oid: int) -> bytes:
    """The check a backend stores with the binding of ``key`` to ``oid`` (format version 3).

    BLAKE2b, 8 bytes, person ``pstore-key``, of the object id as 8 little-endian
    bytes followed by the key in UTF-8 (lone surrogates allowed). A binding whose
    seal does not match was damaged: its reader raises
    :class:`~pstore.errors.CorruptionError` instead of returning another record.
    """
    return hashlib.blake2b(oid.to_bytes(8, "little") + key.encode("utf-8", "surrogatepass"),
                           digest_size=SEAL_SIZE, person=b"pstore-key").digest()


class Backend(ABC):
    """One open connection to one store.

    Subclasses are constructed as ``Backend(path, flag, *, lock_timeout, fsync)``:
    ``flag`` is one of ``'r'``, ``'w'``, ``'c'``, ``'n'`` with the meaning
    :func:`pstore.open` documents; ``lock_timeout`` is how long (seconds)
    :meth:`begin` waits for another process's write transaction before raising
    :class:`~pstore.errors.LockTimeoutError`; ``fsync`` asks for commits that
    survive power loss, not only the death of the process. Opening something
    that is not a store of a format this code reads raises
    :class:`~pstore.errors.FormatError`.
    """

    #: The location the store was opened with, for error messages.
    path: str
    #: True when opened with flag 'r': the backend then writes nothing at all.
    read_only: bool
    #: Every record whose object id is at least this carries a digest (format version 3);
    #: smaller ids may name records written before the store was upgraded to it.
    digests_from: int = 1

    # -- records ----------------------------------------------------------------------------

    @abstractmethod
    def new_oid(self) -> int:
        """Allocate an object id (> 0) that no record has, had, or will be given by another call.

        Inside a write transaction only; ids allocated in a transaction that is rolled
        back may be allocated again.
        """

    @abstractmethod
    def get_record(self, oid: int) -> bytes | None:
        """The data of record ``oid``, or None if there is no such record."""

    @abstractmethod
    def put_record(self, oid: int, data: bytes, refs: Collection[int],
                   *, lazy_refs: Collection[int] = (), blobs: Collection[str] = ()) -> None:
        """Create record ``oid``, or replace its data, refs and blobs if it exists.

        ``lazy_refs``, a subset of ``refs``, are the references that loading the
        record does not follow at once (references to Persistent objects); only
        :meth:`reaches` tells them apart. ``blobs``: the names (from
        :meth:`put_blob`) of the blobs ``data`` uses.
        """

    @abstractmethod
    def delete_record(self, oid: int) -> None:
        """Remove record ``oid``, its refs and its blobs' names; no error if it does not exist."""

    @abstractmethod
    def existing(self, oids: Collection[int]) -> set[int]:
        """The subset of ``oids`` that have a record."""

    @abstractmethod
    def is_referenced(self, oid: int) -> bool:
        """Whether a key is bound to ``oid`` or a record's refs contain it."""

    @abstractmethod
    def reaches(self, sources: Collection[int], target: int) -> bool:
        """Whether ``target`` is one of ``sources`` or reachable from them through refs
        that are not lazy."""

    # -- blobs ------------------------------------------------------------------------------

    @abstractmethod
    def put_blob(self, chunks: Iterable[Any]) -> str:
        """Store the concatenated bytes of the buffers ``chunks`` as a blob; return its name.

        Inside a write transaction. The name is a function of the bytes alone, and
        storing bytes already stored adds nothing. When this returns the blob is
        durable, so a record committed later never names a missing or partial
        blob; if the transaction rolls back, no reader ever sees the blob.
        """

    @abstractmethod
    def get_blob(self, name: str, size: int, *, writable: bool) -> Any:
        """The ``size`` bytes of blob ``name``, as a buffer: mapped into memory if possible.

        ``writable``: the buffer may be written, and writes never reach the store
        (copy-on-write); else it is read-only. A backend that cannot map reads the
        bytes once into the buffer it returns. Raises
        :class:`~pstore.errors.FormatError` naming the blob if it is missing or
        not ``size`` bytes long.
        """

    @abstractmethod
    def read_blob(self, name: str) -> Iterator[bytes]:
        """The bytes of blob ``name``, streamed in chunks (for blobs stored compressed)."""

    # -- keys -------------------------------------------------------------------------------

    @abstractmethod
    def get_key(self, key: str) -> int | None:
        """The object id ``key`` is bound to, or None."""

    @abstractmethod
    def get_item(self, key: str) -> tuple[int, bytes | None] | None:
        """``(object id, record data or None)`` for ``key`` in one step, or None if unbound."""

    @abstractmethod
    def bind_key(self, key: str, oid: int) -> int | None:
        """Bind ``key`` to ``oid``; return the object id it was bound to before, or None."""

    @abstractmethod
    def unbind_key(self, key: str) -> int | None:
        """Remove ``key``; return the object id it was bound to, or None if it was unbound."""

    @abstractmethod
    def iter_keys(self) -> Iterator[str]:
        """Every bound key, each once, streamed: memory does not grow with the number of keys.

        Outside a transaction, keys bound or unbound while the iteration runs may or
        may not be seen.
        """

    @abstractmethod
    def iter_items(self) -> Iterator[tuple[str, int, bytes | None]]:
        """``(key, object id, record data or None)`` of every bound key, streamed as iter_keys."""

    @abstractmethod
    def count_keys(self) -> int:
        """The number of bound keys."""

    # -- transactions and change detection --------------------------------------------------

    @abstractmethod
    def begin(self) -> None:
        """Start a write transaction, first taking the cross-process write lock.

        Sees the latest committed state. Raises
        :class:`~pstore.errors.LockTimeoutError` after ``lock_timeout`` seconds, and
        :class:`~pstore.errors.ReadOnlyError` on a read-only backend.
        """

    @abstractmethod
    def commit(self) -> None:
        """Make the transaction's changes durable and visible to others; release the lock."""

    @abstractmethod
    def rollback(self) -> None:
        """Discard the transaction's changes and release the lock."""

    @abstractmethod
    def change_marker(self) -> Hashable:
        """A value that differs from the previous call's when another connection committed since.

        This connection's own commits need not change it.
        """

    # -- maintenance ------------------------------------------------------------------------

    def iter_records(self) -> Iterator[tuple[int, bytes, list[int]]]:
        """``(object id, data, refs)`` of every record, streamed (for verification).

        A backend that cannot list its records raises ``NotImplementedError``.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list its records")

    def problems(self) -> list[str]:
        """What the backend itself found wrong with its files, one sentence each naming
        the file or entry (e.g. a journal moved aside, an odd entry in the blob
        folder); none by default. :meth:`pstore.Store.verify` reports them."""
        return []

    def is_damage(self, error: Exception) -> bool:
        """Whether ``error``, raised while reading stored bytes, means they are damaged
        (not that the store is busy, closed or locked). By default every error that is
        not one of pstore's own, and :class:`~pstore.errors.FormatError`, is."""
        return not isinstance(error, Error) or isinstance(error, FormatError)

    @abstractmethod
    def gc(self) -> int:
        """Delete every record no key reaches through refs; return how many were deleted.

        Also deletes, when the transaction commits, every blob no remaining record
        names. Inside a write transaction. Readers in other processes are not blocked.
        """

    @abstractmethod
    def after_fork(self) -> None:
        """In a child process after ``fork()``: replace every OS resource shared with the parent.

        The parent's connections and locks must be left as they are (closing or
        unlocking them from the child would act on the parent's).
        """

    @abstractmethod
    def close(self) -> None:
        """Release every resource; a transaction still open is rolled back. Idempotent."""
