"""The identity map: which live Python object is which stored record.

Two directions:

* ``id(obj) -> object id``, used when pickling: an object found here is
  written as a reference. An entry lives exactly as long as its object (the
  map holds the object, weakly when it can), because ``id()`` values are
  reused once an object dies and a stale entry would turn an unrelated object
  into a reference to the wrong record.
* ``object id -> obj``, used when loading, so that one object id is one
  Python object. :meth:`IdentityMap.forget_loads` drops this direction alone
  (another process committed, or a transaction rolled back); the first
  direction stays, so an object the user still holds and assigns again still
  rewrites its own record instead of becoming a copy. Persistent objects
  (added with ``persistent=True``) keep both directions: the Store turns them
  back into placeholders instead, so their object id stays one object for as
  long as it lives.

Objects that cannot be weakly referenced (dict, list, tuple, ...) are held
strongly, and :meth:`IdentityMap.sweep` drops those that nobody else
references any more, so memory is bounded by what the user holds, not by what
was ever loaded.
"""

from __future__ import annotations

import gc
import sys
import types
import weakref
from typing import Any

__all__ = ["IdentityMap", "is_referable"]

# Values whose identity carries no meaning (immutable atoms, and objects pickled by
# name): they are never entered in the map, so a record containing ``True`` or ``"a"``
# never turns into a reference to some other record that happens to hold it.
_UNREFERABLE = (type(None), bool, int, float, complex, str, bytes, range, type,
              types.FunctionType, types.BuiltinFunctionType, types.ModuleType,
              type(Ellipsis), type(NotImplemented))

# Below this many strongly held objects no sweep runs.
_SWEEP_MIN = 1024


# The commonest referable types, answered by one set lookup: isinstance against all of
# _UNREFERABLE is about ten times slower for an object that is none of them.
_CONTAINERS = frozenset({dict, list, tuple, set, frozenset, bytearray})


def is_referable(obj: Any) -> bool:
    """Whether ``obj`` can be a record that other records refer to (its identity matters).

    Named apart from ``gc.is_tracked``, which asks something else.
    """
    return type(obj) in _CONTAINERS or not isinstance(obj, _UNREFERABLE)


class _Ref(weakref.ref):
    __slots__ = ("key",)
    key: int


class IdentityMap:
    """Object ids of live objects, and live objects of object ids."""

    def __init__(self) -> None:
        self.oid_of: dict[int, int] = {}            # id(obj) -> object id
        self._weak: dict[int, _Ref] = {}            # id(obj) -> weak reference
        self._strong: dict[int, Any] = {}           # id(obj) -> obj, for the non-weakref-able
        self._loaded: dict[int, int] = {}           # object id -> id(obj)
        self.persistent: set[int] = set()           # id(obj) of the Persistent objects
        self._sweep_at = _SWEEP_MIN

    def __len__(self) -> int:
        return len(self.oid_of)

    def add(self, obj: Any, oid: int, persistent: bool = False) -> None:
        """Note that ``obj`` is (the current object of) record ``oid``; ``obj`` must be
        :func:`is_referable`.

        ``persistent``: ``obj`` is a Persistent object (see :meth:`forget_loads`).
        """
        key = id(obj)
        if key not in self.oid_of:
            if type(obj).__weakrefoffset__:
                ref = _Ref(obj, self._died)
                ref.key = key
                self._weak[key] = ref
            else:
                self._strong[key] = obj
            if persistent:
                self.persistent.add(key)
        self.oid_of[key] = oid
        self._loaded[oid] = key

    def get(self, oid: int) -> Any:
        """The live object of record ``oid``, or None."""
        key = self._loaded.get(oid)
        if key is None:
            return None
        ref = self._weak.get(key)
        return ref() if ref is not None else self._strong.get(key)

    def remove_oids(self, oids: set[int]) -> None:
        """Forget every object of the records ``oids`` (they were never committed)."""
        if oids:
            # Iterate a copy: a weak reference's callback may remove entries at any
            # allocation (dict.copy() itself runs no Python code).
            for key, oid in self.oid_of.copy().items():
                if oid in oids:
                    self._drop(key)

    def forget_loads(self, oids: Any = None) -> None:
        """Make the next load of ``oids`` (default: every record) read the record again.

        Persistent objects are kept: the caller empties them instead (they reload
        their state in place), so that they stay the objects of their records.
        """
        loaded = self._loaded
        if oids is None:
            loaded.clear()
            # A copy: a weak reference's callback may drop entries at any allocation.
            for key in self.persistent.copy():
                oid = self.oid_of.get(key)
                if oid is not None:
                    loaded[oid] = key
        else:
            for oid in oids:
                if loaded.get(oid) not in self.persistent:
                    loaded.pop(oid, None)

    def persistent_objects(self) -> list[Any]:
        """The live Persistent objects of the map."""
        objects = []
        for key in self.persistent.copy():
            ref = self._weak.get(key)
            obj = ref() if ref is not None else None
            if obj is not None:
                objects.append(obj)
        return objects

    def clear(self) -> None:
        """Forget everything."""
        for ref in self._weak.copy().values():
            ref.key = -1    # a late callback must not touch a new entry with a reused id
        self.oid_of.clear()
        self._weak.clear()
        self._strong.clear()
        self._loaded.clear()
        self.persistent.clear()

    def maybe_sweep(self) -> None:
        """Sweep when the strongly held objects doubled since the last sweep (cheap otherwise)."""
        if len(self._strong) >= self._sweep_at:
            self.sweep()
            self._sweep_at = max(_SWEEP_MIN, 2 * len(self._strong))

    def sweep(self) -> None:
        """Drop the strongly held objects that only this map references.

        Dropping one may leave objects it contained referenced by the map alone, so
        they are checked again, pass after pass. When a pass drops at least as many
        objects as survive it, the next pass checks every survivor (a reference count
        each: cheaper than looking inside the dropped). Otherwise it checks only what
        the dropped objects contained, found among their referents, so a dropped chain
        of records costs time in proportion to its length.
        """
        candidates: list[int] = list(self._strong)
        while candidates:
            unreferenced = [key for key, count in _refcounts(self._strong, candidates)
                            if count <= _ONLY_THE_MAP]
            if unreferenced and 2 * len(unreferenced) >= len(self._strong):
                for key in unreferenced:
                    self._drop_strong(key)
                candidates = list(self._strong)
                continue
            inside: list[int] = []
            for key in unreferenced:
                inside += self._held_inside(self._strong[key])
                self._drop_strong(key)
            # Once each: objects the dropped ones shared (a list in two dicts) come twice.
            candidates = list(dict.fromkeys(inside))

    def _held_inside(self, obj: Any) -> list[int]:
        """The keys of the strongly held objects that ``obj`` contains, directly or through
        containers and instances of its own (not through classes, modules or functions)."""
        found: list[int] = []
        seen = {id(obj)}
        todo = [obj]
        while todo:
            for inner in gc.get_referents(todo.pop()):
                key = id(inner)
                if key in seen or isinstance(inner, _NOT_PART_OF_A_VALUE):
                    continue
                seen.add(key)
                if key in self._strong:
                    found.append(key)
                else:
                    todo.append(inner)
        return found

    def _drop(self, key: int) -> None:
        oid = self.oid_of.pop(key, None)
        self._strong.pop(key, None)
        self.persistent.discard(key)
        ref = self._weak.pop(key, None)
        if ref is not None:
            ref.key = -1
        if oid is not None and self._loaded.get(oid) == key:
            del self._loaded[oid]

    def _drop_strong(self, key: int) -> None:
        """:meth:`_drop` of a strongly held object (never weakly, never Persistent: only
        objects without weak references are held strongly), as the sweep drops many."""
        obj = self._strong.pop(key, None)
        oid = self.oid_of.pop(key, None)
        if oid is not None and self._loaded.get(oid) == key:
            del self._loaded[oid]
        # Released last, once its entries are gone: a finalizer the release runs may make
        # a new object whose id is ``key``.
        del obj

    def _died(self, ref: _Ref) -> None:
        if self._weak.get(ref.key) is ref:
            self._drop(ref.key)


# What a stored value refers to without containing it: the sweep does not look inside.
_NOT_PART_OF_A_VALUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType,
                        types.MethodType, types.CodeType, types.FrameType)


def _refcounts(held: dict[int, Any], keys: list[int]) -> list[tuple[int, int]]:
    """(key, reference count) of the objects of ``held`` under ``keys`` (missing keys skipped)."""
    return [(key, sys.getrefcount(held[key])) for key in keys if key in held]


def _measure_only_the_map() -> int:
    """The reference count :meth:`IdentityMap.sweep` sees for an object only the map holds."""
    probe = IdentityMap()
    probe.add([], 1)
    return _refcounts(probe._strong, list(probe._strong))[0][1]


_ONLY_THE_MAP = _measure_only_the_map()
