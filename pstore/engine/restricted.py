"""Restricted loading: pickles from someone you do not trust, read as data.

:class:`RestrictedUnpickler` is the engine's :class:`~.unpickler.Unpickler` with three
differences:

- A global resolves only when it is in the data policy (:data:`.policy.POLICY`) or
  among the names the caller allows (``allow=["pkg.mod.Name", "pkg.mod.*"]``); it is
  looked up by name *before* anything is imported, and only the module a rule or an
  allowed name names is ever imported. Anything else raises
  :class:`RestrictedUnpicklingError` naming ``module.name``, the opcode, its offset and
  how to allow it.
- REDUCE, NEWOBJ, NEWOBJ_EX, INST and OBJ call only globals resolved that way, after
  the policy's check of their arguments; BUILD acts only on instances of allowed
  classes (so a ``__setstate__`` runs only when its class is allowed); EXT codes
  resolve like globals; persistent ids are refused unless a subclass overrides
  :meth:`~RestrictedUnpickler.persistent_load`.
- A load budget: at most :attr:`~RestrictedUnpickler.mark_limit` marks open at once, and
  the work of hashing non-atomic dict keys and set items (a tuple's hash visits every
  node of its tree, not of its DAG) and of copying containers into allowed
  constructors is counted against a budget proportional to the pickle's size.

``allow="*"`` is the explicit, unsafe opt-out: every global resolves as in
:class:`~.unpickler.Unpickler`, every call runs. A refused load is never retried
unrestricted. Plain data still runs on the C fast path.
"""

from __future__ import annotations

import importlib
import sys
import types
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Callable, Iterable
from pickle import UnpicklingError
from typing import Any

from . import unpickler as _base
from .policy import POLICY, Rule, Use
from .unpickler import Unpickler, _Bad, _need, _opname

__all__ = ["RestrictedUnpickler", "RestrictedUnpicklingError", "restricted_loads"]

# Keys whose hash runs no Python code and visits one object.
_ATOMS = frozenset({str, int, float, bytes, bool, type(None), complex})


class RestrictedUnpicklingError(UnpicklingError):
    """Restricted loading refused something: a global, a call, a BUILD, or the budget.

    ``args`` is ``(reason, module, name, opcode, offset)``: ``module`` and ``name`` are
    the global refused or called (None for a budget or a non-global), ``opcode`` and
    ``offset`` say where in the pickle (None when raised outside a load, e.g. by
    ``find_class``).
    """

    def __init__(self, reason: str, module: str | None = None, name: str | None = None,
                 opcode: str | None = None, offset: int | None = None) -> None:
        super().__init__(reason, module, name, opcode, offset)

    @property
    def reason(self) -> str:
        return self.args[0]

    @property
    def global_name(self) -> str | None:
        """``"module.name"`` of the global concerned, or None."""
        return None if self.args[1] is None else f"{self.args[1]}.{self.args[2]}"

    @property
    def opcode(self) -> str | None:
        return self.args[3]

    @property
    def offset(self) -> int | None:
        return self.args[4]

    def at(self, opcode: str, offset: int) -> RestrictedUnpicklingError:
        """The same refusal, located at ``opcode`` and ``offset``."""
        reason, module, name = self.args[:3]
        return type(self)(reason, module, name, opcode, offset)

    def __str__(self) -> str:
        reason, module, _, opcode, offset = self.args
        name = self.global_name
        text = f"{name}: {reason}" if name else reason
        if opcode is not None:
            text += f" ({opcode} at offset {offset})"
        if name and reason == _NOT_ALLOWED:
            text += (f"; to load it, allow={[name]!r} or allow={[module + '.*']!r}"
                     " if you trust the code it names")
        return text


_NOT_ALLOWED = "global not in the data policy nor allowed"


class _Located(_Bad):
    """Carries a RestrictedUnpicklingError to _run, which knows its opcode and offset."""

    def __init__(self, error: RestrictedUnpicklingError) -> None:
        super().__init__(RestrictedUnpicklingError, error.reason)
        self.error = error

    def located(self, code: int, offset: int) -> BaseException:
        return self.error.at(_opname(code), offset)


def _locating(handler: Callable) -> Callable:
    """``handler``, with a refusal it raises located at its opcode."""
    def located(*args: Any) -> int:
        try:
            return handler(*args)
        except RestrictedUnpicklingError as error:
            raise _Located(error) from None
    located.__name__ = handler.__name__
    return located


# -- the restricted opcode handlers: the check, then the ordinary handler --------------------

def _reduce(u: RestrictedUnpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 2)
    if type(stack[-1]) is tuple:    # else the ordinary handler's error
        u.check_call(stack[-2], stack[-1], {})
    return _base.load_reduce(u, data, pos, stack)


def _newobj(u: RestrictedUnpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 2)
    if type(stack[-1]) is tuple:
        u.check_new(stack[-2], stack[-1], {})
    return _base.load_newobj(u, data, pos, stack)


def _newobj_ex(u: RestrictedUnpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 3)
    if type(stack[-2]) is tuple and type(stack[-1]) is dict:
        u.check_new(stack[-3], stack[-2], stack[-1])
    return _base.load_newobj_ex(u, data, pos, stack)


def _build(u: RestrictedUnpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 2)
    u.check_build(stack[-2], stack[-1])
    return _base.load_build(u, data, pos, stack)


def _check_instantiate(u: RestrictedUnpickler, cls: Any, args: list) -> None:
    # As _instantiate decides: no arguments and a class means cls.__new__(cls).
    if not args and isinstance(cls, type) and not hasattr(cls, "__getinitargs__"):
        u.check_new(cls, (), {})
    else:
        u.check_call(cls, tuple(args), {})


def _obj(u: RestrictedUnpickler, data: bytes, pos: int, items: list, outer: list) -> int:
    if items:
        _check_instantiate(u, items[0], items[1:])
    return _base.load_obj(u, data, pos, items, outer)


def _inst(u: RestrictedUnpickler, data: bytes, pos: int, items: list, outer: list) -> int:
    module, name, pos = _base._global_name(data, pos)
    cls = u.find_class(module, name)
    _check_instantiate(u, cls, items)
    outer.append(_base._instantiate(cls, items))
    return pos


def _setitem(u: RestrictedUnpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 3)
    u.check_key(stack[-2])
    return _base.load_setitem(u, data, pos, stack)


def _keys_then(handler: Callable, step: int) -> Callable:
    """A mark consumer that hashes every ``step``-th item: their hashes are charged first."""
    def checked(u: RestrictedUnpickler, data: bytes, pos: int, items: list, outer: list) -> int:
        check_key = u.check_key
        flat = 0    # the work of tuples of atoms, the common non-atomic key, charged at once
        for key in items[::step]:
            kind = type(key)
            if kind in _ATOMS:
                continue
            if kind is tuple and _ATOMS.issuperset(map(type, key)):
                flat += len(key) + 1
            else:
                check_key(key)
        u.charge(flat)
        return handler(u, data, pos, items, outer)
    checked.__name__ = handler.__name__
    return checked


def _restricted_tables() -> tuple[list[Any], list[Any]]:
    handlers: list[Any] = list(_base._HANDLERS)
    mark_handlers: list[Any] = list(_base._MARK_HANDLERS)
    byte = {op.name: op.byte for op in _base.BY_CODE.values()}
    replaced: dict[str, Callable[..., int]] = {
        "REDUCE": _reduce, "NEWOBJ": _newobj, "NEWOBJ_EX": _newobj_ex, "BUILD": _build,
        "SETITEM": _setitem}
    for name, handler in replaced.items():
        handlers[byte[name]] = handler
    mark_replaced: dict[str, Callable[..., int]] = {
        "OBJ": _obj, "INST": _inst,
        "SETITEMS": _keys_then(_base.load_setitems, 2), "DICT": _keys_then(_base.load_dict, 2),
        "ADDITEMS": _keys_then(_base.load_additems, 1),
        "FROZENSET": _keys_then(_base.load_frozenset, 1)}
    for name, handler in mark_replaced.items():
        mark_handlers[byte[name]] = handler
    # Everything that may refuse (these, and the handlers that resolve globals or
    # persistent ids) reports the opcode and offset it refused at.
    for name in [*replaced, "GLOBAL", "STACK_GLOBAL", "EXT1", "EXT2", "EXT4",
                 "PERSID", "BINPERSID"]:
        handlers[byte[name]] = _locating(handlers[byte[name]])
    for name in mark_replaced:
        mark_handlers[byte[name]] = _locating(mark_handlers[byte[name]])
    return handlers, mark_handlers


_RESTRICTED_HANDLERS, _RESTRICTED_MARK_HANDLERS = _restricted_tables()


def _parts(node: Any) -> Any:
    """What hashing ``node`` hashes in turn (None for a leaf): the items of a tuple or
    frozenset, the bounds of a slice (hashable from Python 3.12 on)."""
    if isinstance(node, (tuple, frozenset)):
        return node
    if type(node) is slice:
        return (node.start, node.stop, node.step)
    return None


def _node_count(key: Any, limit: int, counts: dict[int, tuple[int, Any]]) -> int:
    """How many objects hashing ``key`` visits (tuples, frozensets and slices hash their
    parts again at every reference), counted over its distinct nodes; stops above ``limit``.

    ``counts`` maps the id of each node earlier calls counted to (its count, the node):
    tuples, frozensets and slices cannot change, and holding the node keeps its id its own.
    """
    todo: list[tuple[Any, bool]] = [(key, False)]
    while todo:
        node, children_counted = todo.pop()
        if children_counted:
            total = 1 + sum(counts[id(child)][0] for child in _parts(node))
            if total > limit:
                return total
            counts[id(node)] = (total, node)
        elif id(node) not in counts:
            parts = _parts(node)
            if parts is not None:
                todo.append((node, True))
                todo.extend((child, False) for child in parts if id(child) not in counts)
            else:
                counts[id(node)] = (1, node)
    return counts[id(key)][0]


_NOTHING_ALLOWED: tuple[bool, frozenset[str], frozenset[str]] = (False, frozenset(), frozenset())


def _parse_allow(allow: str | Iterable[str]) -> tuple[bool, frozenset[str], frozenset[str]]:
    """``allow`` as (everything?, exact "module.name"s, modules allowed whole)."""
    if allow == ():
        return _NOTHING_ALLOWED
    if allow == "*":
        return True, frozenset(), frozenset()
    if isinstance(allow, str):
        raise TypeError(f"allow must be '*' or a list of names, not the string {allow!r}")
    names, modules = set(), set()
    for entry in allow:
        parts = entry.split(".") if isinstance(entry, str) else []
        if len(parts) < 2 or not all(part.isidentifier() for part in parts[:-1]) \
                or not (parts[-1].isidentifier() or parts[-1] == "*"):
            raise ValueError(f"allow entries are 'pkg.mod.Name' or 'pkg.mod.*', not {entry!r}")
        if parts[-1] == "*":
            modules.add(entry[:-2])
        else:
            names.add(entry)
    return False, frozenset(names), frozenset(modules)


class RestrictedUnpickler(Unpickler):
    """An :class:`~.unpickler.Unpickler` that loads only data (see the module docs).

    ``allow`` adds globals to the data policy: ``"pkg.mod.Name"`` (a qualified name for
    protocol 4+ nested classes) or ``"pkg.mod.*"`` (every global of that module, not of
    its submodules); allowed names are trusted fully (called with any arguments).
    ``allow="*"`` resolves every global and runs every call, as the full unpickler
    does: only for pickles you trust. Other arguments are :class:`Unpickler`'s.

    A subclass may override :meth:`persistent_load` (refused by default) and extend
    :meth:`find_class`; errors it raises from them are reported as raised.
    """

    #: At most this many MARKs open at once (each costs a list): pickles nest only as deep
    #: as their data, which no pickler writes this deep.
    mark_limit: int = 100_000
    #: The budget of one load, in objects visited by hashing and items copied by allowed
    #: constructors: this much, plus ``work_per_byte`` for every byte of the pickle.
    work_base: int = 10_000_000
    work_per_byte: int = 16

    _handlers = _RESTRICTED_HANDLERS
    _mark_handlers = _RESTRICTED_MARK_HANDLERS

    def __init__(self, file: Any, *, allow: str | Iterable[str] = (), fix_imports: bool = True,
                 encoding: str = "ASCII", errors: str = "strict",
                 buffers: Iterable[Any] | None = None) -> None:
        super().__init__(file, fix_imports=fix_imports, encoding=encoding, errors=errors,
                         buffers=buffers)
        self._restrict(allow)

    def _restrict(self, allow: str | Iterable[str]) -> None:
        self._unrestricted, self._allowed_names, self._allowed_modules = _parse_allow(allow)
        self._mark_limit = self.mark_limit
        #: id -> (object, (module, name), its rule or None for a name the caller allowed),
        #: for every global resolved: calls and BUILDs act only on these.
        self._resolved: dict[int, tuple[Any, tuple[str, str], Rule | None]] = {}
        self._work = 0
        self._work_limit = self.work_base
        self._node_counts: dict[int, tuple[int, Any]] | None = None

    # -- globals -----------------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        """Return the global ``module.name`` if the policy or ``allow`` admits it.

        The name (after the Python 2 mapping of protocols 0-2) is looked up before any
        import; only then is its module imported. Raises RestrictedUnpicklingError.
        """
        if self._unrestricted:
            return super().find_class(module, name)
        sys.audit("pickle.find_class", module, name)
        if self.proto < 3 and self.fix_imports:
            if (module, name) in NAME_MAPPING:
                module, name = NAME_MAPPING[(module, name)]
            elif module in IMPORT_MAPPING:
                module = IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        rule = POLICY.get((module, name))
        if rule is None and qualified not in self._allowed_names \
                and module not in self._allowed_modules:
            raise RestrictedUnpicklingError(_NOT_ALLOWED, module, name)
        obj: Any = importlib.import_module(module)
        for part in name.split(".") if rule is None else (name,):
            # An allowed module's globals are its classes and functions: not what another
            # module it imported holds, nor what lies behind a dunder (__globals__...).
            if rule is None and (part == "<locals>" or part[:2] == part[-2:] == "__"):
                raise RestrictedUnpicklingError("a local or special name cannot be loaded",
                                                module, name)
            obj = getattr(obj, part)
            if isinstance(obj, types.ModuleType):
                raise RestrictedUnpicklingError("names a module, not a global of it", module,
                                                name)
        known = self._resolved.get(id(obj))
        if known is None or known[2] is None:     # a policy rule wins over a plain allow
            self._resolved[id(obj)] = (obj, (module, name), rule)
        return obj

    def persistent_load(self, pid: Any) -> Any:
        """Refuse: persistent ids are the store's, which overrides this."""
        raise RestrictedUnpicklingError("persistent id refused (no persistent_load handles it)")

    # -- checks the restricted handlers and the policy's rules call ---------------------------

    def _known(self, obj: Any, action: str) -> tuple[tuple[str, str], Rule | None]:
        entry = self._resolved.get(id(obj))
        if entry is None or entry[0] is not obj:
            raise RestrictedUnpicklingError(
                f"{action} acts only on allowed globals, not on a {type(obj).__name__} object")
        return entry[1], entry[2]

    def check_call(self, func: Any, args: tuple, kwargs: dict) -> None:
        """Refuse calling ``func(*args, **kwargs)`` unless the policy or ``allow`` admits it."""
        if self._unrestricted:
            return
        name, rule = self._known(func, "a call")
        if rule is None:
            return
        if rule.use is Use.CONSTANT or (rule.use is Use.TYPE and (args or kwargs)):
            raise RestrictedUnpicklingError(f"may not be called ({rule.use.value} of the policy)",
                                            *name)
        self._apply(rule, name, args, kwargs)

    def check_new(self, cls: Any, args: tuple, kwargs: dict) -> None:
        """Refuse ``cls.__new__(cls, *args, **kwargs)`` unless ``cls`` is an allowed class."""
        if self._unrestricted:
            return
        name, rule = self._known(cls, "NEWOBJ")
        if rule is None:
            return
        if rule.use is Use.TYPE:
            if args or kwargs:
                raise RestrictedUnpicklingError("may be created only without arguments", *name)
        elif rule.use is Use.CLASS:
            self._apply(rule, name, args, kwargs)
        else:
            raise RestrictedUnpicklingError(f"is not a class of the policy ({rule.use.value})",
                                            *name)

    def _apply(self, rule: Rule, name: tuple[str, str], args: tuple, kwargs: dict) -> None:
        if rule.check is not None:
            try:
                rule.check(self, args, kwargs)
            except ValueError as exc:
                raise RestrictedUnpicklingError(f"arguments refused: {exc}", *name) from None

    def require_class(self, obj: Any, role: str) -> None:
        """Raise ValueError unless ``obj`` is a class resolved as allowed in this load."""
        entry = self._resolved.get(id(obj)) if isinstance(obj, type) else None
        if entry is None or entry[0] is not obj or \
                (entry[2] is not None and entry[2].use not in (Use.CLASS, Use.TYPE)):
            raise ValueError(f"the {role} must be an allowed class, not {_describe(obj)}")

    def check_build(self, inst: Any, state: Any) -> None:
        """Refuse BUILD (``__setstate__`` or attribute updates) unless ``inst``'s class, or a
        base of it, is an allowed class. On a class of the policy without ``__setstate__``,
        only its ``__dict__`` may be updated: no setattr of slots (a defaultdict's factory)."""
        if self._unrestricted:
            return
        for cls in type(inst).__mro__[:-1]:
            entry = self._resolved.get(id(cls))
            if entry is not None and entry[0] is cls and \
                    (entry[2] is None or entry[2].use in (Use.CLASS, Use.TYPE)):
                if entry[2] is not None and type(state) is tuple \
                        and getattr(inst, "__setstate__", None) is None:
                    raise RestrictedUnpicklingError("BUILD may not set slots of a class of the "
                                                    "policy", *entry[1])
                return
        raise RestrictedUnpicklingError(
            f"BUILD acts only on instances of allowed classes, not on {_describe(type(inst))}")

    def charge(self, work: int) -> None:
        """Count ``work`` against this load's budget; refuse the load once it is spent."""
        self._work += work
        if self._work > self._work_limit:
            raise RestrictedUnpicklingError(
                f"load budget of {self._work_limit} exceeded (hashing and copying)")

    def check_key(self, key: Any) -> None:
        """Charge hashing ``key`` before it is hashed: refused if that would exceed the budget."""
        if type(key) in _ATOMS:
            return
        if _parts(key) is not None:
            if self._node_counts is None:
                self._node_counts = {}
            self.charge(_node_count(key, self._work_limit - self._work, self._node_counts))
        else:
            self.charge(1)

    # -- a load's budget starts with it ------------------------------------------------------

    def _run(self, data: bytes, pos: int, origin: int,
             refill: Callable[[int], bytes] | None,
             resumed: tuple[list, list] | None = None) -> tuple[Any, int, int]:
        # A persistent_load may load nested pickles: each has its own budget, of its
        # whole length (C may have read its start already: it charges nothing).
        saved = self._work, self._work_limit, self._node_counts
        self._work = 0
        self._work_limit = self.work_base + self.work_per_byte * (len(data) - origin)
        self._node_counts = None    # made by the first key that needs counting
        try:
            return super()._run(data, pos, origin, refill, resumed)
        finally:
            self._work, self._work_limit, self._node_counts = saved


def _describe(obj: Any) -> str:
    if isinstance(obj, type):
        return f"class {obj.__module__}.{obj.__qualname__}"
    return f"a {type(obj).__name__} object"


def restricted_loads(data: Any, /, *, allow: str | Iterable[str] = (), fix_imports: bool = True,
                     encoding: str = "ASCII", errors: str = "strict",
                     buffers: Iterable[Any] | None = None) -> Any:
    """Return the object pickled in ``data`` (bytes-like), loaded as :class:`RestrictedUnpickler`
    does; data after the STOP opcode is ignored."""
    if type(data) is not bytes:
        data = bytes(memoryview(data))
    # As loads() does: no file, the bytes read in place.
    unpickler = RestrictedUnpickler.__new__(RestrictedUnpickler)
    unpickler._setup(fix_imports, encoding, errors, None)
    unpickler._restrict(allow)
    return unpickler.load_bytes_at(data, 0, buffers)[0]
