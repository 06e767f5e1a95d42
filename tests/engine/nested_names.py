"""Globals with dotted qualified names, for the conformance tests.

They live in a module of their own, which imports nothing but the standard library, so that
other Python versions can import it too (tests/engine/test_conformance.py runs them).
"""

from __future__ import annotations

import sys


class Outer:
    class Inner:
        class Deepest:
            pass

        def method(self) -> None:
            pass

    @staticmethod
    def static() -> None:
        pass


class Recursive:
    """Reached through a module attribute: its qualified name runs through the module."""


Recursive.mod = sys.modules[__name__]  # type: ignore[attr-defined]
Recursive.__qualname__ = "Recursive.mod.Recursive"


class ThroughModule:
    class Nested:
        """Qualified name ``ThroughModule.mod.ThroughModule.Nested``: its parent is a class."""


ThroughModule.mod = sys.modules[__name__]  # type: ignore[attr-defined]
ThroughModule.Nested.__qualname__ = "ThroughModule.mod.ThroughModule.Nested"

#: Each way a global's qualified name can have dots.
NESTED = [Outer.Inner, Outer.Inner.Deepest, Outer.Inner.method, Outer.static, Recursive,
          ThroughModule.Nested]
