"""Persistent objects: records of their own, change tracking, lazy loading.

A :class:`Persistent` instance saved in a Store gets a record of its own
wherever it appears, and every record holding it refers to it by object id.
Such a reference loads as a *placeholder*: an instance of the right class with
no state, which loads its record the first time one of its attributes is used.
Assigning or deleting an attribute marks the instance changed, and the Store
writes it at its next commit. See ``docs/persistent.md``.

This module holds the objects' side: the base classes, the few functions the
Store calls to make, fill, empty and detach them, and :class:`DataManager`, the
two calls an object makes to its Store (after the ``persistent`` package's
``IPersistentDataManager.setstate``/``register``). The Store
(``pstore/store/store.py``) does the reading and writing.
"""

from __future__ import annotations

import copyreg
from collections import UserDict, UserList
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import ArgumentError, PersistentClassError

__all__ = ["Persistent", "PersistentList", "PersistentDict", "DataManager"]

# What a Persistent object's _p_status slot holds.
SAVED = 0      # its state in memory is its record's (or it is in no store yet)
CHANGED = 1    # changed since its record was written: the Store writes it at its next commit
GHOST = 2      # a placeholder: no state in memory, loaded at the first attribute access
LOADING = 3    # its state is being loaded: attribute access neither loads nor marks it changed

_object_getattribute = object.__getattribute__
_object_setattr = object.__setattr__
_object_delattr = object.__delattr__


class DataManager(Protocol):
    """What a Persistent object asks of the store it belongs to (its ``_p_store``).

    The object calls these, and nothing else of its store; the store calls the
    functions at the end of this module on the object.
    """

    @property
    def path(self) -> str:
        """The store's location, for error messages."""

    def setstate(self, obj: Persistent) -> None:
        """Load the state of placeholder ``obj`` from its record (called at its first use).

        Returns at once if ``obj`` is no longer a placeholder; raises
        :class:`~pstore.errors.ClosedError` on a closed store, and
        :class:`~pstore.errors.MissingObjectError` if the record is gone.
        """

    def register(self, obj: Persistent) -> None:
        """Note the first change of ``obj`` since its record was written: the store writes
        it at its next commit (a read-only or closed store keeps the change in memory)."""


class Persistent:
    """Base class of objects that are stored as records of their own and track their changes.

    What a user may rely on:

    * Saved in a Store (assigned to a key, or inside anything that is), an
      instance gets its own record; every other record refers to it by object
      id, so it is stored once and loads as one object. References may form
      cycles.
    * Assigning or deleting an attribute marks it changed; the Store writes it
      at its next commit (the end of a ``transaction()``, ``sync()``,
      ``close()``, or any assignment outside a transaction). Mutating a plain
      list or dict held in an attribute is not seen: set ``obj._p_changed =
      True``, or use :class:`PersistentList` / :class:`PersistentDict`.
    * Loaded through a reference, it is a placeholder of the right class
      (``isinstance`` works) whose state is read at the first attribute access.
    * ``_p_oid`` is its object id (None before it is first saved), ``_p_store``
      its Store (None before), ``_p_changed`` None for a placeholder, True when
      it has unsaved changes, else False. Names starting with ``_p_`` are
      pstore's.
    * Its state is its ``__dict__``, or what ``__getstate__`` returns (and
      ``__setstate__`` takes). Subclasses may not declare non-empty
      ``__slots__``.
    * Pickled outside a store (``pstore.engine.dumps``, ``pickle``,
      ``copy.deepcopy``), it is an ordinary object: the copy has the same state
      and belongs to no store.
    """

    __slots__ = ("__dict__", "__weakref__", "_p_oid", "_p_store", "_p_status")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        slots = cls.__dict__.get("__slots__", ())
        if isinstance(slots, str) or slots:
            # Slots would be state that neither the record nor a placeholder reset covers.
            raise PersistentClassError(cls.__qualname__, "subclasses of pstore.Persistent keep "
                                       "their state in __dict__ and may not declare __slots__")

    def __new__(cls, *args: Any, **kwargs: Any) -> Persistent:
        obj = super().__new__(cls)
        _set_oid(obj, None)
        _set_store(obj, None)
        _set_status(obj, SAVED)
        return obj

    def __getattribute__(self, name: str) -> Any:
        # Every attribute access passes here: one slot read and a comparison when loaded.
        if _status_of(self) == GHOST and name != "__class__" and name[:3] != "_p_":
            _store_of(self).setstate(self)
        return _object_getattribute(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name[:3] == "_p_":
            _object_setattr(self, name, value)
            return
        if _status_of(self) == GHOST:
            _store_of(self).setstate(self)
        _object_setattr(self, name, value)
        mark_changed(self)

    def __delattr__(self, name: str) -> None:
        if name[:3] == "_p_":
            _object_delattr(self, name)
            return
        if _status_of(self) == GHOST:
            _store_of(self).setstate(self)
        _object_delattr(self, name)
        mark_changed(self)

    @property
    def _p_changed(self) -> bool | None:
        """None for a placeholder; True when changed since last written; else False.

        Set it to True after mutating something the object cannot see (a plain list
        or dict in one of its attributes), so that the next commit writes it.
        """
        status = _status_of(self)
        return None if status == GHOST else status == CHANGED

    @_p_changed.setter
    def _p_changed(self, value: bool) -> None:
        if not value:
            raise ArgumentError("_p_changed", value, "True (to mark the object changed)")
        if _status_of(self) == GHOST:
            _store_of(self).setstate(self)
        mark_changed(self)

    def __getstate__(self) -> Any:
        """The state that is stored: by default the instance's ``__dict__``."""
        return self.__dict__

    def __setstate__(self, state: Any) -> None:
        """Take the state ``__getstate__`` returned (by default, a dict of attributes)."""
        if state:
            _object_getattribute(self, "__dict__").update(state)

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        # Outside a store: an ordinary object of the same class and state, in no store.
        return copyreg.__newobj__, (type(self),), self.__getstate__()  # type: ignore[attr-defined]


_OID = Persistent.__dict__["_p_oid"]
_STORE = Persistent.__dict__["_p_store"]
_STATUS = Persistent.__dict__["_p_status"]
_status_of: Callable[[Persistent], int] = _STATUS.__get__
_store_of: Callable[[Persistent], DataManager] = _STORE.__get__
_set_oid = _OID.__set__
_set_store = _STORE.__set__
_set_status = _STATUS.__set__


def mark_changed(obj: Persistent) -> None:
    """Note that ``obj`` changed: its Store writes it at the next commit.

    Cheap when it is already marked or in no store.
    """
    if _status_of(obj) != CHANGED:
        store = _store_of(obj)
        if store is not None:
            store.register(obj)


class PersistentList(Persistent, UserList[Any]):
    """A list (``collections.UserList``) that is Persistent and notices its own mutations.

    ``append``, ``extend``, item assignment and deletion, ``sort`` and every other
    mutating method mark it changed. The items are its state: plain items are
    stored inside its record, Persistent ones as references.
    """


class PersistentDict(Persistent, UserDict[Any, Any]):
    """A dict (``collections.UserDict``) that is Persistent and notices its own mutations.

    Item assignment and deletion, ``update``, ``pop``, ``setdefault`` and every
    other mutating method mark it changed.
    """

    def copy(self) -> PersistentDict:
        """A new, unsaved PersistentDict with the same items."""
        # UserDict.copy would swap self.data out and back: two changes that are none.
        return type(self)(self.data)


def _marking(method: Callable[..., Any]) -> Callable[..., Any]:
    def mutate(self: Persistent, *args: Any, **kwargs: Any) -> Any:
        result = method(self, *args, **kwargs)
        mark_changed(self)
        return result

    mutate.__name__ = method.__name__
    mutate.__qualname__ = method.__qualname__
    mutate.__doc__ = method.__doc__
    return mutate


# The methods that change the container's data in place. The others of MutableSequence
# and MutableMapping (e.g. MutableMapping.update, pop, setdefault) go through these.
for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "insert", "pop",
              "remove", "clear", "reverse", "sort", "extend"):
    setattr(PersistentList, _name, _marking(getattr(UserList, _name)))
for _name in ("__setitem__", "__delitem__", "__ior__"):
    setattr(PersistentDict, _name, _marking(getattr(UserDict, _name)))
del _name


# -- what the Store does to its objects ---------------------------------------------------------

#: status_of(obj): SAVED, CHANGED, GHOST or LOADING; set_status(obj, status).
status_of = _status_of
set_status = _set_status


def is_ghost(obj: Any) -> bool:
    """Whether ``obj`` (any object) is a placeholder whose state is not loaded."""
    return isinstance(obj, Persistent) and _status_of(obj) == GHOST


def placeholder(cls: type[Persistent], store: DataManager, oid: int) -> Persistent:
    """A new placeholder of record ``oid`` of ``store``: a ``cls`` without state."""
    obj = cls.__new__(cls)
    _set_oid(obj, oid)
    _set_store(obj, store)
    _set_status(obj, GHOST)
    return obj


def attach(obj: Persistent, store: DataManager, oid: int) -> None:
    """Make ``obj``, in no store yet, the object of record ``oid`` of ``store``."""
    _set_oid(obj, oid)
    _set_store(obj, store)
    _set_status(obj, SAVED)


def detach(obj: Persistent) -> None:
    """Make ``obj`` (not a placeholder) an object of no store, with the state it has."""
    _set_oid(obj, None)
    _set_store(obj, None)
    _set_status(obj, SAVED)


def fill(obj: Persistent, load_state: Callable[[], Any]) -> None:
    """Give placeholder ``obj`` the state ``load_state()`` returns; on failure it stays one."""
    _set_status(obj, LOADING)
    try:
        obj.__setstate__(load_state())
    except BaseException:
        ghostify(obj)
        raise
    _set_status(obj, SAVED)


def ghostify(obj: Persistent) -> None:
    """Turn ``obj`` back into a placeholder: drop its state; the next access loads it again."""
    _object_getattribute(obj, "__dict__").clear()
    _set_status(obj, GHOST)
