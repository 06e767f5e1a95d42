"""The record unpickler of records not signed by the Store's key: restricted loading
(``docs/safety.md``, "The store") with the store's persistent ids. Apart from
:mod:`.codec` so that ``import pstore`` does not import the engine's restricted
unpickler and its data policy: a store of one's own records never needs them."""

from __future__ import annotations

import io
import weakref
from collections.abc import Iterable
from typing import Any

from ..engine.restricted import RestrictedUnpickler, RestrictedUnpicklingError
from .codec import ReferenceLoading, Resolver
from .renames import Renames

__all__ = ["RestrictedRecordUnpickler"]


class RestrictedRecordUnpickler(ReferenceLoading, RestrictedUnpickler):
    """:class:`~.codec.RecordUnpickler` under restricted loading, for every record not signed by the
    Store's key: globals only from the data policy and ``allow``; persistent ids only in
    pstore's forms, the class a reference names checked by the policy before any import
    (protocol 0's text form) or required to be a class this load resolved so (binary)."""

    def __init__(self, resolver: Resolver, allow: str | Iterable[str], path: str = "",
                 renames: Renames | None = None) -> None:
        super().__init__(io.BytesIO(), allow=allow)
        self._resolver = weakref.proxy(resolver)
        self._path = path
        self._renames = renames     # applied before the policy sees a name

    def _reference_class(self, cls: Any) -> Any:
        if not self._unrestricted:
            try:
                self.require_class(cls, "class of a reference to a Persistent object")
            except ValueError as error:
                raise RestrictedUnpicklingError(str(error)) from None
        return cls

    def _named_class(self, module: str, qualname: str) -> Any:
        return self.find_class(module, qualname)    # the dotted name checked as a whole
