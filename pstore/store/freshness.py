"""What a Store knows to be current: the change marker it last saw, and the key bindings
it has read since.

Outside a transaction every read sees the latest commit (``docs/store.md``); in a
snapshot, the commit latest at its start, looked for once. The
backend's change marker (one cheap query) tells whether another process committed
since the Store last looked; if one did, everything loaded may be stale: plain
objects are forgotten and Persistent objects without unsaved changes become
placeholders again, to reload at their next use. Until then, a key read before whose
object is still loaded is answered from memory.
"""

from __future__ import annotations

from typing import Any

from ..backends.base import ReadableBackend
from .identity import IdentityMap
from .persistent import SAVED, ghostify, is_ghost, status_of

__all__ = ["Freshness"]

#: At most this many key bindings are remembered for repeated gets.
KNOWN_KEYS_MAX = 1 << 16


class Freshness:
    """The change marker ``backend`` last gave, and the key bindings read since then
    (outside transactions) whose objects ``ids`` may still hold."""

    def __init__(self, backend: ReadableBackend, ids: IdentityMap) -> None:
        self._backend = backend
        self._ids = ids
        self._marker = backend.change_marker()
        self._key_oids: dict[str, int] = {}
        #: True while a snapshot is open (see :meth:`hold`): the state cannot change.
        self.held = False

    def see_latest(self) -> None:
        """Forget what is loaded if another process committed since the last look."""
        if self.held:
            return
        marker = self._backend.change_marker()
        if marker != self._marker:
            self._marker = marker
            self.invalidate()

    def hold(self) -> None:
        """A snapshot began: look once more, then hold what is loaded as current (no
        marker query) until ``held`` is set False at its end."""
        self.see_latest()
        self.held = True

    def invalidate(self) -> None:
        """Make every record load again: forget the plain objects loaded, and turn the
        Persistent objects without unsaved changes back into placeholders."""
        self._key_oids.clear()
        self._ids.forget_loads()
        for obj in self._ids.persistent_objects():
            if status_of(obj) == SAVED:
                ghostify(obj)

    def loaded(self, key: str) -> tuple[int, Any] | None:
        """``(object id, object)`` of ``key`` answered from memory -- its binding read
        since, its object still loaded -- once the change marker (one query) says that no
        other process committed; else None (at once, with no query, for a key not read
        since)."""
        if key not in self._key_oids:
            return None
        self.see_latest()   # clears _key_oids if another process committed
        oid = self._key_oids.get(key)
        if oid is None:
            return None
        obj = self._ids.get(oid)
        return None if obj is None or is_ghost(obj) else (oid, obj)

    def remember(self, key: str, oid: int) -> None:
        """``key`` was just read, outside a transaction, bound to ``oid``."""
        if len(self._key_oids) >= KNOWN_KEYS_MAX:
            self._key_oids.clear()
        self._key_oids[key] = oid

    def forget_keys(self) -> None:
        """Key bindings may change (a write transaction begins): read them again."""
        self._key_oids.clear()

    def reset(self) -> None:
        """In a forked child: a change marker means something only to the connection
        that read it."""
        self._marker = self._backend.change_marker()
