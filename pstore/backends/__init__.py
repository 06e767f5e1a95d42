"""Storage backends behind one interface, :class:`~pstore.backends.base.Backend`
(:class:`~pstore.backends.base.ReadableBackend` for read-only views).

:data:`BACKENDS` names every backend :func:`pstore.open` accepts; the tests of
``tests/backends`` and ``tests/store`` run against each of them. :data:`READERS`
names read-only views of files pstore did not write. A backend is imported
only when a store is opened with it.

A name may carry a variant after a colon, passed as ``variant=`` to a backend
whose class sets ``takes_variant``: ``"dbm:dbm.dumb"`` is the DBM backend on
the ``dbm.dumb`` module.
"""

from __future__ import annotations

import importlib
import os

from ..errors import ArgumentError
from .base import Backend, ReadableBackend

__all__ = ["BACKENDS", "READERS", "SCHEMES", "Backend", "ReadableBackend", "detect_backend",
           "open_backend", "whichdb"]

#: backend name -> "module:class" implementing :class:`Backend`.
BACKENDS: dict[str, str] = {
    "sqlite": "pstore.backends.sqlite:SQLiteBackend",
    "dbm": "pstore.backends.dbm:DBMBackend",
    "postgresql": "pstore.backends.postgresql:PostgreSQLBackend",
}

#: URL scheme -> the backend a location of that scheme implies.
SCHEMES: dict[str, str] = {"postgresql": "postgresql", "postgres": "postgresql"}

#: Like :data:`BACKENDS`, for read-only views (flag 'r' only, a
#: :class:`~pstore.backends.base.ReadableBackend`): not in the write tests.
READERS: dict[str, str] = {
    "shelve": "pstore.backends.shelf:ShelveReader",
}


def detect_backend(location: str) -> str | None:
    """The backend of the store at ``location``, told without opening it as a store:
    the one its URL scheme names (``postgresql://...``), else the one whose files are
    there; None where there is nothing pstore knows (a new path, another kind of file).

    An SQLite file with pstore's application id is the SQLite backend's; a file of a dbm
    module (``dbm.whichdb``) the DBM backend's, which itself tells a pstore store from
    a shelve file.
    """
    scheme, colon, _ = location.partition("://")
    if colon:
        return SCHEMES.get(scheme.lower())
    try:
        with open(location, "rb") as file:
            header = file.read(72)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        header = b""
    if header[:16] == b"SQLite format 3\0" and header[68:72] == b"pStr":
        return "sqlite"
    return "dbm" if whichdb(location) else None


#: The files a database of some dbm module at PATH has, one at least (``dbm.whichdb``
#: looks at no other), and the saved index of dbm.dumb's rewrite.
_DBM_SUFFIXES = ("", ".db", ".pag", ".dir", ".dat", ".dir.saved")


def whichdb(path: str) -> str | None:
    """``dbm.whichdb(path)``, also right while a dbm.dumb apply is to be finished.

    A kill during dbm.dumb's index rewrite can leave no index file at all, which
    ``dbm.whichdb`` then takes for no database; the saved index tells otherwise. So
    does a data file whose index was lost: it must not be taken for no store.
    """
    if not any(os.path.lexists(path + suffix) for suffix in _DBM_SUFFIXES):
        return None     # nothing there: spares a new store's first open the import of dbm
    import dbm  # here, not in the DBM backend's modules: every open without backend= asks

    found = dbm.whichdb(path)
    if found is None and (os.path.exists(path + ".dir.saved") or size_of(path + ".dat")):
        return "dbm.dumb"   # a data file without its index: DumbModule.open says so
    return found


def size_of(*paths: str) -> int:
    """The bytes of the files ``paths`` together, 0 for each that is missing."""
    total = 0
    for path in paths:
        try:
            total += os.stat(path).st_size
        except FileNotFoundError:
            pass
    return total


def open_backend(name: str, path: str, flag: str, *, lock_timeout: float,
                 fsync: bool) -> ReadableBackend:
    """Open the store at ``path`` with the backend called ``name``.

    ``name`` is a key of :data:`BACKENDS` or :data:`READERS`, optionally followed
    by ``:variant``; :class:`~pstore.errors.ArgumentError` for an unknown name, or a
    variant the backend does not take.
    """
    base, colon, variant = name.partition(":")
    target = BACKENDS.get(base) or READERS.get(base)
    if target is None:
        raise ArgumentError("backend", name, f"one of {', '.join(sorted([*BACKENDS, *READERS]))}"
                                             f" (optionally with ':variant')")
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not colon:
        return cls(path, flag, lock_timeout=lock_timeout, fsync=fsync)
    if not cls.takes_variant:
        raise ArgumentError("backend", name, f"{base!r} alone: backend {base!r} has no variants")
    return cls(path, flag, lock_timeout=lock_timeout, fsync=fsync, variant=variant)
