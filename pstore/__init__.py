"""pstore: a persistent object store for Python.

    with pstore.open("data.db") as s:
        s["k"] = obj
"""

from __future__ import annotations

from .errors import (ClosedError, CorruptionError, Error, FormatError, LockTimeoutError, MissingObjectError,
                     ReadOnlyError)
from .store import Store, open
from .store.persistent import Persistent, PersistentDict, PersistentList
from .convert import convert_shelve

__version__ = "0.1.0"

__all__ = [
    "open", "Store", "convert_shelve", "Persistent", "PersistentList", "PersistentDict",
    "Error", "ClosedError", "ReadOnlyError", "LockTimeoutError", "FormatError",
    "CorruptionError", "MissingObjectError",
]
