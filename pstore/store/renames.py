"""Class renames: the names records were written with, mapped to the names they have now.

``pstore.open(..., renames={"old.module.Name": "new.module.Name", "old.module": "new.module"})``
gives a :class:`Renames`. Every global a record names -- its class, a Persistent
reference's class, a function it was reduced with -- goes through :meth:`Renames.apply`
before anything is imported:

* a key equal to the global's whole ``module.name`` renames that global: the value is
  its new ``module.name``, split at its last dot, or, for a class nested in a class,
  ``module:Outer.Inner`` (a colon where the module ends);
* otherwise a key equal to the global's module, or to a package the module is in,
  renames the module (``"old.pkg": "new.pkg"`` also maps ``old.pkg.sub`` to
  ``new.pkg.sub``); the longest such key wins.

Names are used as they are written: nothing here imports or checks that the new name
exists (a wrong one raises :class:`~pstore.errors.MissingClassError` when a record needs it).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import ArgumentError

__all__ = ["Renames"]


class Renames:
    """A checked ``renames=`` mapping (see the module's docstring)."""

    def __init__(self, renames: Mapping[str, str]) -> None:
        if not isinstance(renames, Mapping):
            raise ArgumentError("renames", renames, "a mapping of old names to new names")
        self._globals: dict[str, tuple[str, str]] = {}
        self._modules: dict[str, str] = {}
        for old, new in renames.items():
            if not (_is_dotted(old) and _is_dotted(new)):
                raise ArgumentError("renames", {old: new}, "dotted names ('module.Name' or "
                                    "'module'; 'module:Outer.Inner' for a nested class)")
            old = old.replace(":", ".", 1)
            module, separator, name = new.partition(":")
            if not separator:
                module, _, name = new.rpartition(".")
            if module:      # a module's new name without a dot renames no global
                self._globals[old] = (module, name)
            self._modules[old] = new.replace(":", ".", 1)
        #: The mapping as given, for a Store opened again elsewhere.
        self.mapping: dict[str, str] = dict(renames)

    def apply(self, module: str, name: str) -> tuple[str, str]:
        """The ``(module, name)`` to import for the global a record names as ``module.name``."""
        renamed = self._globals.get(f"{module}.{name}")
        if renamed is not None:
            return renamed
        package = module
        while package:
            new = self._modules.get(package)
            if new is not None:
                return new + module[len(package):], name
            package = package.rpartition(".")[0]
        return module, name

    def rename(self, full_name: str) -> str:
        """``full_name`` (``module.Qualname``, as inspection prints it) under the renames, for
        output only: split at its last dot, it is renamed as :meth:`apply` renames it."""
        module, _, name = full_name.rpartition(".")
        if not module:
            return full_name
        module, name = self.apply(module, name)
        return f"{module}.{name}"


def _is_dotted(name: object) -> bool:
    """A name of a module or a global: dotted identifiers, one colon at most."""
    return isinstance(name, str) and all(
        part.isidentifier() for part in name.replace(":", ".", 1).split("."))
