"""Classes whose instances the pickle corpus holds (see make_corpus.py).

This module must import under Python 2.7 and every Python 3 the corpus is
written by: pickles refer to it as the top-level module ``corpus_classes``, so
whoever loads the corpus puts ``tests/data`` on ``sys.path`` first. Renaming a
class or changing what its pickling methods return invalidates the corpus.
"""


class OldStyle:
    """An old-style class under Python 2 (pickled with INST/OBJ), a plain class under 3."""

    def __init__(self, a=None):
        self.a = a


class NewStyle(object):
    """A new-style class whose state is its ``__dict__``."""

    def __init__(self, a=None, b=None):
        self.a = a
        self.b = b


class Slotted(object):
    """No ``__dict__``: its state is the values of its slots."""

    __slots__ = ("x", "y")

    def __init__(self, x=None, y=None):
        self.x = x
        self.y = y


class WithState(object):
    """Pickles part of its ``__dict__`` and marks itself when restored."""

    def __init__(self, a=None):
        self.a = a
        self.cache = "not pickled"

    def __getstate__(self):
        return {"a": self.a}

    def __setstate__(self, state):
        self.a = state["a"]
        self.restored = True


class WithReduce(object):
    """Rebuilt by calling the class with one argument."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return (WithReduce, (self.value,))


class WithNewArgs(object):
    """Its ``__new__`` needs arguments, which ``__getnewargs__`` supplies."""

    def __new__(cls, x, y):
        self = object.__new__(cls)
        self.x = x
        self.y = y
        return self

    def __getnewargs__(self):
        return (self.x, self.y)


class Outer(object):
    """Holds a nested class, which only qualified names (protocol 4) can name directly."""

    class Inner(object):
        def __init__(self, a=None):
            self.a = a
