"""Classes the store tests pickle; a module of their own so that other processes import them."""

from __future__ import annotations

import pstore


class Config:
    def __init__(self, name: str, size: int = 0) -> None:
        self.name = name
        self.size = size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and vars(self) == vars(other)

    __hash__ = object.__hash__


class Unpicklable:
    def __reduce__(self):
        raise TypeError("Unpicklable refuses to be pickled")


class Node(pstore.Persistent):
    """A Persistent object with a name, children and whatever else a test gives it."""

    def __init__(self, name: str, children: list | None = None) -> None:
        self.name = name
        self.children = [] if children is None else children


class Tagged(pstore.Persistent):
    """Its state is what __getstate__ returns, not its __dict__."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __getstate__(self) -> tuple:
        return ("v1", self.tag)

    def __setstate__(self, state: tuple) -> None:
        self.tag = state[1]


class Shell:
    """Pickles to a call of os.system: what a hostile record does (never load it trusted)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)

    def __setstate__(self, state):     # what a NEWOBJ+BUILD gadget calls
        import os

        os.system(state)
