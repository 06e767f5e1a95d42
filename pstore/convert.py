"""Copying data written by other tools into a pstore store."""

from __future__ import annotations

import os
from itertools import islice

from .store import DEFAULT_LOCK_TIMEOUT, open

__all__ = ["convert_shelve"]


def convert_shelve(source: str | os.PathLike[str], target: str | os.PathLike[str], *,
                   backend: str = "sqlite", flag: str = "c", batch: int = 1000,
                   lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> int:
    """Copy every key of the ``shelve`` file ``source`` into the store ``target``; return how many.

    ``source`` is read with the read-only ``"shelve"`` backend, so its values are
    unpickled by pstore's engine, never by the standard library's ``pickle``;
    it is left untouched. ``target`` is opened with ``backend`` and ``flag`` as
    by :func:`pstore.open` (``flag="n"`` empties it first); a key already there
    is overwritten. Keys are written ``batch`` at a time, each batch one
    transaction: if the copy fails, the batches before the failure are in
    ``target``, and running it again completes it.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    count = 0
    with open(source, "r", backend="shelve") as shelf, \
            open(target, flag, backend=backend, lock_timeout=lock_timeout) as store:
        items = iter(shelf.items())
        while chunk := list(islice(items, batch)):
            store.update(chunk)
            count += len(chunk)
    return count
