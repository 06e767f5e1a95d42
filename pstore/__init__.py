"""pstore: a persistent object store for Python.

    with pstore.open("data.db") as s:
        s["k"] = obj
"""

from __future__ import annotations

from .errors import (ClosedError, CorruptionError, Error, FormatError, LockTimeoutError,
                     MissingObjectError, ReadOnlyError)
from .errors import MissingModuleError
from .store import Store, open
from .store.persistent import Persistent, PersistentDict, PersistentList
from .migrate import convert, convert_shelve, copy

__version__ = "0.1.0"

__all__ = [
    "open", "Store", "convert", "convert_shelve", "copy", "Persistent", "PersistentList", "PersistentDict",
    "Error", "ClosedError", "ReadOnlyError", "LockTimeoutError", "FormatError",
    "MissingObjectError", "CorruptionError",
    "MissingModuleError",
]
