"""The store layer: :func:`open` and :class:`Store`, on top of :mod:`pstore.backends`."""

from __future__ import annotations

from .store import DEFAULT_LOCK_TIMEOUT, Store, open

__all__ = ["Store", "open", "DEFAULT_LOCK_TIMEOUT"]
