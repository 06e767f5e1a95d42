"""pstore: a persistent object store for Python.

    with pstore.open("data.db") as s:
        s["k"] = obj
"""

from __future__ import annotations

from .errors import (ArgumentError, ClosedError, ConnectionLostError, CorruptionError, Error,
                     FormatError, InTransactionError, IntegrityError, KeyFileError, KeyTypeError,
                     LockTimeoutError, MissingModuleError, MissingObjectError,
                     PersistentClassError, ReadOnlyError, ReferenceCycleError,
                     ServerLockTimeoutError, StorePicklingError, UnsafeFileError, UnstorableError,
                     UntrustedError)
from .store import Store, open
from .store.persistent import Persistent, PersistentDict, PersistentList
from .migrate import convert, convert_shelve, copy

#: The one place the version is stated (pyproject.toml reads it from here).
__version__ = "0.1.0"

__all__ = [
    "open", "Store", "convert", "convert_shelve", "copy", "Persistent", "PersistentList", "PersistentDict",
    "Error", "ClosedError", "ReadOnlyError", "LockTimeoutError", "FormatError",
    "MissingObjectError", "CorruptionError", "UnstorableError", "ReferenceCycleError",
    "ArgumentError", "KeyTypeError", "PersistentClassError", "InTransactionError",
    "StorePicklingError", "IntegrityError", "UntrustedError", "KeyFileError",
    "MissingModuleError", "UnsafeFileError", "ConnectionLostError", "ServerLockTimeoutError",
]
