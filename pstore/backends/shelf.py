"""Reading files written by the standard library's ``shelve``, as a read-only store."""

from __future__ import annotations

import dbm
from collections.abc import Collection, Iterator
from typing import Any

from ..errors import ClosedError, FormatError, ReadOnlyError
from .base import ReadableBackend
from .dbm import FORMAT_KEY, choose_module
from .files import INHERITED, require_existing

__all__ = ["ShelveReader"]

class ShelveReader(ReadableBackend):
    """A read-only view of a file written by the standard library's ``shelve``.

    Open it with ``pstore.open(path, "r", backend="shelve")`` (``"shelve:dbm.dumb"``
    names the module; by default the one that wrote the file). Keys are the
    shelve's keys (UTF-8 decoded, as ``shelve`` encodes them); each value is one
    record, loaded by pstore's own unpickler, so values keep the identity of the
    objects inside them but no sharing across keys (shelve stores none).
    ``shelve`` has no locks: do not read a file another process is writing.
    Any flag but 'r' raises :class:`~pstore.errors.ReadOnlyError`; it implements
    the read-only part of the backend contract only, so a Store on it refuses
    every write with that error. :func:`pstore.convert_shelve` copies a shelve
    into a pstore store.
    """

    name = "shelve"
    digests_from = 1 << 63      # a shelve's values are plain pickles, without digests
    takes_variant = True

    def __init__(self, path: str, flag: str, *, lock_timeout: float, fsync: bool,
                 variant: str | None = None) -> None:
        self.path = path
        self.read_only = True
        if flag != "r":
            raise ReadOnlyError(path, f"open a shelve file with flag {flag!r} (only 'r')")
        require_existing(path, flag, lambda: dbm.whichdb(path) is not None)
        self._module = choose_module(path, flag, variant)
        self._db: Any = None
        self._open()
        if self._handle().get(FORMAT_KEY) is not None:
            self.close()
            raise FormatError(path, "a pstore store, not a shelve file: open it with "
                                    "backend='dbm'")
        # Object ids are handed out as keys are read: the file has none of its own.
        self._oids: dict[bytes, int] = {}
        self._keys: list[bytes] = [b""]     # object id -> DBM key; id 0 is never used

    def _open(self) -> None:
        try:
            self._db = self._module.open(self.path, "r")
        except (OSError, ValueError, SyntaxError) as error:
            raise FormatError(self.path, f"not a readable {self._module.name} database "
                                         f"({error})") from None

    def _oid(self, key: bytes) -> int:
        oid = self._oids.get(key)
        if oid is None:
            oid = self._oids[key] = len(self._keys)
            self._keys.append(key)
        return oid

    def _handle(self) -> Any:
        if self._db is None:
            raise ClosedError(self.path)
        return self._db

    def get_blob(self, name: str, size: int, *, writable: bool) -> Any:
        raise FormatError(self.path, f"a shelve file has no blobs (asked for blob {name})")

    def read_blob(self, name: str) -> Iterator[bytes]:
        raise FormatError(self.path, f"a shelve file has no blobs (asked for blob {name})")

    def get_record(self, oid: int) -> bytes | None:
        if not 0 < oid < len(self._keys):
            return None
        return self._handle().get(self._keys[oid])

    def existing(self, oids: Collection[int]) -> set[int]:
        return {oid for oid in oids if self.get_record(oid) is not None}

    def get_key(self, key: str) -> int | None:
        encoded = key.encode("utf-8")
        return self._oid(encoded) if encoded in self._handle() else None

    def get_item(self, key: str) -> tuple[int, bytes | None] | None:
        encoded = key.encode("utf-8")
        data = self._handle().get(encoded)
        return None if data is None else (self._oid(encoded), data)

    def iter_keys(self) -> Iterator[str]:
        """Every key; streamed where the module can iterate (dbm.dumb, dbm.sqlite3), else listed."""
        db = self._handle()
        for key in (iter(db) if hasattr(db, "__iter__") else db.keys()):
            yield key.decode("utf-8")

    def iter_items(self) -> Iterator[tuple[str, int, bytes | None]]:
        for key in self.iter_keys():
            item = self.get_item(key)
            if item is not None:
                yield (key, *item)

    def count_keys(self) -> int:
        return len(self._handle())

    def change_marker(self) -> int:
        return 0

    # A shelve file is read as one state already (nothing may write it meanwhile).
    def begin_read(self) -> None:
        pass

    def end_read(self) -> None:
        pass

    def after_fork(self) -> None:
        if self._db is not None:
            INHERITED.append(self._db)
            self._open()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
