"""The views :meth:`Store.items <pstore.store.Store.items>` and :meth:`Store.values
<pstore.store.Store.values>` return: records streamed a batch at a time, and ``errors=``,
what a record whose class cannot be imported does to the iteration."""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterator, Mapping, MappingView, ValuesView
from typing import Any, Literal, get_args

from ..errors import ArgumentError, MissingClassError

__all__ = ["LoadErrors", "LoadingItems", "LoadingValues"]

#: What iterating over values does with a record whose class is gone (``errors=``).
LoadErrors = Literal["raise", "skip", "collect"]
_LOAD_ERRORS = get_args(LoadErrors)

#: Streams a store's ``(key, value)`` pairs; given a list, it leaves out each record whose
#: class is gone and appends its error there instead of raising it.
PairSource = Callable[[list[MissingClassError] | None], Iterator[tuple[str, Any]]]


class _LoadingView(MappingView):
    """What both views share: the pairs of ``store`` as ``pairs`` streams them, ``errors=``."""

    def __init__(self, store: Mapping[str, Any], pairs: PairSource, errors: str) -> None:
        if errors not in _LOAD_ERRORS:
            raise ArgumentError("errors", errors, "'raise', 'skip' or 'collect'")
        super().__init__(store)     # the MappingView's: len() and ``in`` ask the store
        self._stream = pairs
        self._errors = errors
        #: With ``errors="collect"``: the errors of the records the last iteration left out.
        self.skipped: list[MissingClassError] = []

    def _pairs(self) -> Iterator[tuple[str, Any]]:
        if self._errors == "raise":
            return self._stream(None)
        skipped: list[MissingClassError] = []
        if self._errors == "collect":
            self.skipped = skipped
        return self._stream(skipped)


class LoadingItems(_LoadingView, ItemsView[str, Any]):
    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self._pairs()


class LoadingValues(_LoadingView, ValuesView[Any]):
    def __iter__(self) -> Iterator[Any]:
        return (value for _, value in self._pairs())
