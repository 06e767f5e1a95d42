"""Classes the store tests pickle; a module of their own so that other processes import them."""

from __future__ import annotations


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
