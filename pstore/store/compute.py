"""Compute once: a value stored under a key, computed by exactly one process when missing.

:func:`get_or_compute` is behind :meth:`Store.get_or_compute
<pstore.store.Store.get_or_compute>` and :func:`memoize` behind
:meth:`Store.memoize <pstore.store.Store.memoize>`; see docs/datasets.md.

Exactly one process computes a missing value because computing happens under a
*key lock*: a cross-process lock of the backend's naming one key
(:meth:`Backend.key_lock <pstore.backends.base.Backend.key_lock>`), not the
store's write lock, so other keys stay readable and writable while a long
computation runs. A waiter that gets the lock looks again before computing, and
finds the value the holder stored.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import CodeType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .. import engine
from ..errors import Error, ReadOnlyError

if TYPE_CHECKING:
    from .store import Store

__all__ = ["get_or_compute", "memoize", "Memoized", "arguments_digest", "code_digest"]

T = TypeVar("T")

#: The first item of every value :func:`memoize` stores: (MEMO_TAG, code digest, result).
MEMO_TAG = "pstore.memoize/1"


class ComputeInTransactionError(Error, RuntimeError):
    """get_or_compute was asked for a missing key inside an open transaction.

    Its value would only be visible to other processes at the transaction's commit,
    after the key lock is released, so they could compute it too.
    """

    def __init__(self, path: str, key: str) -> None:
        super().__init__(path, key)
        self.path = path
        self.key = key

    def __str__(self) -> str:
        return (f"cannot compute the missing key {self.key!r} of store {self.path!r} inside a "
                f"transaction: other processes would not see it until the commit; call "
                f"get_or_compute outside s.transaction()")


def get_or_compute(store: Store, key: str, compute: Callable[[], T], *,
                   key_lock: Callable[[str, float], AbstractContextManager[None]],
                   timeout: float | None = None,
                   valid: Callable[[Any], bool] | None = None) -> Any:
    """The value of ``key``, or ``compute()``'s result stored under it if it is missing.

    With several processes (or threads) asking at once for a missing key, exactly one
    runs ``compute`` while the others wait for its key lock, then load what it
    stored. If ``compute`` raises, nothing is stored, the exception reaches its
    caller, and the waiters go on to try in turn. ``timeout``: seconds to wait for
    another process's computation (None: as long as it takes); past it,
    :class:`~pstore.LockTimeoutError`. ``valid(value)``: False makes a stored
    value count as missing, so it is computed again and replaced. ``key_lock``: the
    backend's :meth:`~pstore.backends.base.Backend.key_lock`.
    """
    found = _lookup(store, key, valid)
    if found is not _MISSING:
        return found
    if store.read_only:
        raise ReadOnlyError(store.path, f"compute the missing key {key!r}")
    if store.in_transaction:
        raise ComputeInTransactionError(store.path, key)
    with key_lock(key, float("inf") if timeout is None else timeout):
        found = _lookup(store, key, valid)     # computed by the process we waited for?
        if found is not _MISSING:
            return found
        value = compute()
        store[key] = value
        return value


_MISSING = object()


def _lookup(store: Store, key: str, valid: Callable[[Any], bool] | None) -> Any:
    try:
        value = store[key]
    except KeyError:
        return _MISSING
    return value if valid is None or valid(value) else _MISSING


class Memoized(Generic[T]):
    """A function whose results are stored in a store, one key per distinct call.

    Calling it returns the stored result for these arguments, or computes it once
    (across processes, as :func:`get_or_compute` does). :meth:`key` names the key a
    call uses; :meth:`forget` deletes one call's result.
    """

    def __init__(self, store: Store, func: Callable[..., T], name: str,
                 check_code: bool) -> None:
        self._store = store
        self._signature = inspect.signature(func)
        self._prefix = f"{MEMO_TAG}:{name}:"
        self._code = code_digest(func) if check_code else None
        self.__wrapped__ = func
        functools.update_wrapper(self, func)

    def key(self, *args: Any, **kwargs: Any) -> str:
        """The key under which the result of ``func(*args, **kwargs)`` is stored."""
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return self._prefix + arguments_digest(bound.arguments)

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        func = self.__wrapped__

        def compute() -> tuple[str, str | None, T]:
            return (MEMO_TAG, self._code, func(*args, **kwargs))

        entry = self._store.get_or_compute(self.key(*args, **kwargs), compute,
                                           valid=self._is_current)
        return entry[2]

    def _is_current(self, entry: Any) -> bool:
        return (type(entry) is tuple and len(entry) == 3 and entry[0] == MEMO_TAG
                and (self._code is None or entry[1] == self._code))

    def forget(self, *args: Any, **kwargs: Any) -> bool:
        """Delete the stored result of this call; True if there was one."""
        try:
            del self._store[self.key(*args, **kwargs)]
        except KeyError:
            return False
        return True


def memoize(store: Store, func: Callable[..., T] | None = None, *, name: str | None = None,
            check_code: bool = True) -> Any:
    """``@memoize(store)`` or ``@memoize(store, name=..., check_code=...)``: see :class:`Memoized`.

    ``name`` (default: the function's ``module.qualname``) is the key prefix, so it
    must differ between memoized functions of one store. ``check_code``: a result
    computed by a different body of the function (its bytecode, constants and
    defaults) counts as missing and is computed again, replacing the old one.
    """
    def wrap(f: Callable[..., T]) -> Memoized[T]:
        return Memoized(store, f, name or f"{f.__module__}.{f.__qualname__}", check_code)

    return wrap if func is None else wrap(func)


# -- digests -------------------------------------------------------------------------------

def arguments_digest(arguments: Any) -> str:
    """A hex digest equal for equal arguments: how memoize keys a call.

    Arguments are made canonical -- every dict's items and every set's members put
    in a fixed order (that of their canonical pickles) -- then pickled by the engine
    with protocol 5 in fast mode (no memo, so that sharing between arguments does not
    change the bytes), and hashed with BLAKE2b. So two calls share a key when their
    arguments are equal *and of the same types*, whatever the insertion order of their
    dicts and sets: ``f(1)`` and ``f(1.0)`` do not; nor do two objects whose pickles
    differ (an object's ``__dict__`` is taken in insertion order). Arguments that
    cannot be pickled raise ``TypeError``; recursive ones ``ValueError``.
    """
    return hashlib.blake2b(_canonical_pickle(_canonical(arguments)), digest_size=20).hexdigest()


def _canonical_pickle(obj: Any) -> bytes:
    file = io.BytesIO()
    pickler = engine.Pickler(file, 5)
    pickler.fast = True
    try:
        pickler.dump(obj)
    except engine.PicklingError as error:
        raise TypeError(f"memoize cannot key a call whose arguments cannot be pickled: "
                        f"{error}") from error
    return file.getvalue()


class _Sorted(tuple):
    """(container type name, its items or members in canonical order): pickled with its
    class's name, so no argument value of a plain type pickles the same."""


def _canonical(obj: Any) -> Any:
    kind = type(obj)
    if kind is dict:    # (an OrderedDict's order is part of its value: kept as pickled)
        items = [(_canonical(k), _canonical(v)) for k, v in obj.items()]
        items.sort(key=lambda item: _canonical_pickle(item[0]))
        return _Sorted(("dict", tuple(items)))
    if kind is set or kind is frozenset:
        members = [_canonical(member) for member in obj]
        members.sort(key=_canonical_pickle)
        return _Sorted((kind.__name__, tuple(members)))
    if kind is list:
        return [_canonical(item) for item in obj]
    if kind is tuple:
        return tuple(_canonical(item) for item in obj)
    return obj


def code_digest(func: Callable[..., Any]) -> str:
    """A hex digest of what a function computes with: its bytecode, names and constants
    (nested functions' too, frozensets in a fixed order) and its defaults.

    Not its file name or line numbers, so moving a function does not change it; a
    new Python version (new bytecode) does. Callables without ``__code__`` (builtins,
    classes) are digested by their qualified name only.
    """
    digest = hashlib.blake2b(digest_size=16)
    code = getattr(func, "__code__", None)
    if code is None:
        digest.update(repr((getattr(func, "__module__", None),
                            getattr(func, "__qualname__", repr(func)))).encode())
        return digest.hexdigest()
    _digest_code(digest, code)
    digest.update(_stable_repr(getattr(func, "__defaults__", None)).encode())
    digest.update(_stable_repr(getattr(func, "__kwdefaults__", None)).encode())
    return digest.hexdigest()


def _digest_code(digest: Any, code: CodeType) -> None:
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_argcount,
                        code.co_kwonlyargcount)).encode())
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            _digest_code(digest, constant)
        else:
            digest.update(_stable_repr(constant).encode())


def _stable_repr(value: Any) -> str:
    """repr, but the same in every process: frozensets (hash-ordered) are sorted."""
    if isinstance(value, frozenset):
        return "frozenset(" + ", ".join(sorted(_stable_repr(v) for v in value)) + ")"
    if isinstance(value, tuple):
        return "(" + ", ".join(_stable_repr(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(sorted(f"{_stable_repr(k)}: {_stable_repr(v)}"
                                      for k, v in value.items())) + "}"
    return repr(value)
