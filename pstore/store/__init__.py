"""The store layer: :func:`open` and :class:`Store`, on top of :mod:`pstore.backends`.

Its rooms: ``opening`` (:func:`open`: options checked, the backend chosen), ``store``
(the mapping, lifecycle, reading), ``freshness`` (what is known to be current),
``views`` (``items()``/``values()``), ``transaction`` (pending writes and their commit),
``codec`` (record pickler and unpickler, and the loader resolving references),
``records`` (a record's bytes), ``identity`` (the identity map), ``persistent``
(Persistent objects and their data-manager protocol) and ``inspection`` (records read
without loading them). docs/architecture.md lists them all.
"""

from __future__ import annotations

from .opening import DEFAULT_LOCK_TIMEOUT, open
from .store import Store

__all__ = ["Store", "open", "DEFAULT_LOCK_TIMEOUT"]
