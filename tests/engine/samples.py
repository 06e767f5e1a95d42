"""Objects that exercise every part of the pickle format, shared by the engine's tests.

The classes live at module level so that both picklers can find them by name.
"""

from __future__ import annotations

import collections
import copyreg
import datetime
import decimal
import enum
import fractions
import re
import uuid
from typing import Any


class Plain:
    def __init__(self, x: Any = 1) -> None:
        self.x = x
        self.items = [x, str(x)]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self) -> None:
        self.a = 1
        self.b = "two"

    def __eq__(self, other: object) -> bool:
        return type(other) is Slotted and (other.a, other.b) == (self.a, self.b)


class SlottedWithDict(Slotted):
    __slots__ = ("__dict__",)

    def __init__(self) -> None:
        super().__init__()
        self.extra = [3]


class WithState:
    def __init__(self) -> None:
        self.secret = "s"

    def __getstate__(self) -> Any:
        return {"public": self.secret.upper()}

    def __setstate__(self, state: Any) -> None:
        self.secret = state["public"].lower()

    def __eq__(self, other: object) -> bool:
        return type(other) is WithState and other.secret == self.secret


class NewArgs:
    def __new__(cls, value: int) -> NewArgs:
        self = super().__new__(cls)
        self.value = value
        return self

    def __getnewargs__(self) -> tuple:
        return (self.value,)


class NewArgsEx:
    def __new__(cls, *args: Any, **kwargs: Any) -> NewArgsEx:
        self = super().__new__(cls)
        self.args, self.kwargs = args, kwargs
        return self

    def __getnewargs_ex__(self) -> tuple:
        return self.args, self.kwargs


class Reduced:
    """A reduce value with every optional item: state, listitems, dictitems."""

    def __init__(self) -> None:
        self.log: list = []
        self.mapping: dict = {}

    def __reduce__(self) -> tuple:
        return (Reduced, (), {"tag": "t"}, iter(["a", "b"]), iter([("k", 1), ("l", 2)]))

    def append(self, item: Any) -> None:
        self.log.append(item)

    def extend(self, items: Any) -> None:
        self.log.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.mapping[key] = value


def set_state(obj: Any, state: Any) -> None:
    obj.__dict__.update(state, via_setter=True)


class WithStateSetter:
    def __reduce__(self) -> tuple:
        return (WithStateSetter, (), {"x": 1}, None, None, set_state)


class ReducedByName:
    def __reduce__(self) -> str:
        return "REDUCED_SINGLETON"


REDUCED_SINGLETON = ReducedByName()


class Outer:
    class Inner:
        class Deepest:
            pass


class Color(enum.Enum):
    RED = 1


class IntSubclass(int):
    pass


class ListSubclass(list):
    pass


class DictSubclass(dict):
    pass


def module_function() -> None:
    pass


def recursive_list() -> list:
    x: list = []
    x.append(x)
    return x


def recursive_tuple() -> tuple:
    inner: list = []
    t = (inner,)
    inner.append(t)
    return t


def recursive_dict() -> dict:
    d: dict = {}
    d["self"] = d
    return d


def recursive_object() -> Plain:
    p = Plain()
    p.me = p
    return p


def shared() -> list:
    s = [1, "s"]
    f = frozenset({1, 2})
    return [s, s, (s, s), {"a": s}, f, f, "dup", "dup"]


LENGTHS = [0, 1, 2, 3, 4, 255, 256, 999, 1000, 1001, 1999, 2000, 2001, 3000]


def containers_of_every_length() -> list[Any]:
    out: list[Any] = []
    for n in LENGTHS:
        out += [list(range(n)), tuple(range(n)), {i: -i for i in range(n)}, set(range(n)),
                frozenset(range(n)), "x" * n, b"y" * n, bytearray(b"z" * n),
                [str(i) for i in range(n)]]
    return out


def scalars() -> list[Any]:
    ints = [0, 1, 255, 256, 65535, 65536, -1, -128, -129, -256, -(2**31), 2**31 - 1, 2**31,
            -(2**31) - 1, 2**63, -(2**63), 2**64, 2**2048, -(2**2048) - 7]
    floats = [0.0, -0.0, 1.5, 1e100, -1e-300, float("inf"), float("-inf"), 3.141592653589793]
    strs = ["", "a", "é", "日本", "\U0001f600", "a\\b\nc\rd\x00e\x1af", "\udc80lone", "x" * 300]
    return [None, True, False, *ints, *floats, *strs, b"", b"\x00\xff", complex(1, -2)]


def stdlib_values() -> list[Any]:
    return [
        datetime.datetime(2020, 1, 2, 3, 4, 5, 6),
        datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc),
        datetime.date(1999, 12, 31), datetime.time(23, 59), datetime.timedelta(days=3, seconds=5),
        decimal.Decimal("1.10"), fractions.Fraction(1, 3),
        collections.OrderedDict(a=1, b=2), collections.defaultdict(list, a=[1]),
        collections.deque([1, 2], maxlen=5), collections.Counter("hello"), uuid.UUID(int=12345),
        re.compile(r"a+b", re.I), range(1, 10, 2), slice(1, None, 3),
        type(None), type(...), type(NotImplemented), ..., NotImplemented,
        len, int, object, Plain, Outer.Inner.Deepest, module_function, Color.RED,
        copyreg.__newobj__,
    ]


def objects() -> list[Any]:
    return [
        Plain(), Plain([1, 2]), Slotted(), SlottedWithDict(), WithState(), NewArgs(5),
        NewArgsEx(1, 2, k="v"), Reduced(), WithStateSetter(), REDUCED_SINGLETON,
        Outer.Inner.Deepest(), IntSubclass(7), ListSubclass([1, 2]), DictSubclass(a=1),
        recursive_list(), recursive_tuple(), recursive_dict(), recursive_object(), shared(),
    ]


def all_samples() -> list[Any]:
    return scalars() + stdlib_values() + objects() + containers_of_every_length()
