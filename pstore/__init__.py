"""pstore: a persistent object store for Python.

    with pstore.open("data.db") as s:
        s["k"] = obj
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (
    ArgumentError,
    ClosedError,
    ConnectionLostError,
    CorruptionError,
    Error,
    FormatError,
    IntegrityError,
    InTransactionError,
    KeyFileError,
    KeyTypeError,
    LockTimeoutError,
    MissingClassError,
    MissingModuleError,
    MissingObjectError,
    PersistentClassError,
    ReadOnlyError,
    ReferenceCycleError,
    ServerLockTimeoutError,
    StorePicklingError,
    UnsafeFileError,
    UnstorableError,
    UntrustedError,
)
from .store import Store, open
from .store.persistent import Persistent, PersistentDict, PersistentList

#: The one place the version is stated (pyproject.toml reads it from here).
__version__ = "0.1.0"

__all__ = [
    "open", "Store", "convert", "convert_shelve", "copy",
    "Persistent", "PersistentList", "PersistentDict",
    "Error", "ClosedError", "ReadOnlyError", "LockTimeoutError", "FormatError",
    "MissingObjectError", "CorruptionError", "UnstorableError", "ReferenceCycleError",
    "ArgumentError", "KeyTypeError", "PersistentClassError", "InTransactionError",
    "StorePicklingError", "IntegrityError", "UntrustedError", "KeyFileError", "MissingClassError",
    "MissingModuleError", "UnsafeFileError", "ConnectionLostError", "ServerLockTimeoutError",
]

# Imported at first use, not by ``import pstore`` (cold start: docs/store.md, "Speed").
_LAZY = {"convert": "pstore.migrate", "convert_shelve": "pstore.migrate", "copy": "pstore.migrate"}


if TYPE_CHECKING:   # what the lazy names are, for type checkers
    from .migrate import convert, convert_shelve, copy


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pstore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
