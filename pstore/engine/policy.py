"""The data policy: the globals that restricted loading resolves, reviewed one by one.

Restricted loading (:mod:`.restricted`) resolves a global only from :data:`POLICY` or
from the names its caller allows; a name found in neither is refused before any
import. Each rule says what the global is used for (:class:`Use`), what it can reach
when a hostile pickle chooses its arguments (``reach``, listed in docs/safety.md),
and, where those arguments could cost unbounded memory or time, a ``check`` run
before every call.

numpy and pandas globals are in the table too: they resolve only when the package is
installed (the module named by the rule is imported, after the name was found here);
pstore itself imports neither.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["MAX_INT_BITS", "POLICY", "Guard", "Rule", "Use"]


class Use(enum.Enum):
    """What a pickle may do with a global of the policy."""

    #: Called by REDUCE/INST/OBJ (after its check), and as a class with NEWOBJ.
    CLASS = "class"
    #: Called by REDUCE (after its check); not a class.
    FUNCTION = "function"
    #: A class that is never called with arguments: it may be the class of NEWOBJ with
    #: no arguments (``cls.__new__(cls)``), the target of BUILD, and the class argument
    #: of an allowed function (``copyreg._reconstructor``, numpy's ``_reconstruct``...).
    TYPE = "type"
    #: A value only (``Ellipsis``): never called.
    CONSTANT = "constant"


class Guard(Protocol):
    """What a rule's check may ask of the unpickler that runs it."""

    def require_class(self, obj: Any, role: str) -> None:
        """Raise ValueError unless ``obj`` is a class this load may instantiate."""

    def check_call(self, func: Any, args: tuple, kwargs: dict) -> None:
        """Apply the rule of ``func`` (an allowed global) to a call with these arguments."""

    def charge(self, work: int) -> None:
        """Count ``work`` against the load's budget (raise when it is spent)."""

    def check_key(self, key: Any) -> None:
        """Charge the cost of hashing ``key``; refuse a key whose hash would run away."""


#: ``check(guard, args, kwargs)`` raises ValueError naming what is refused.
Check = Callable[[Guard, tuple, dict], None]


@dataclass(frozen=True)
class Rule:
    use: Use
    #: What the global can reach with arguments a hostile pickle chooses (reviewed).
    reach: str
    check: Check | None = None


#: Ints passed to arithmetic that is superlinear in their size (gcd) are refused above this.
MAX_INT_BITS = 1 << 16

# -- checks --------------------------------------------------------------------------------

# Containers whose length is what iterating them costs: no generator, no range, no object
# whose __iter__ is code. Their contents came from the pickle, so their size is paid for.
_SIZED = (list, tuple, dict, set, frozenset, str, bytes, bytearray)
_TEXT_CODECS = frozenset({"latin1", "latin-1", "ascii", "utf-8", "utf8"})


def _arity(args: tuple, kwargs: dict, most: int) -> None:
    if len(args) > most:
        raise ValueError(f"takes at most {most} arguments here, got {len(args)}")
    if kwargs:
        raise ValueError("takes no keyword arguments here")


def _sized(guard: Guard, value: Any) -> None:
    if type(value) not in _SIZED:
        raise ValueError(f"needs a list, tuple, dict, set or string, not {type(value).__name__}")
    guard.charge(len(value))


def _collection(guard: Guard, args: tuple, kwargs: dict) -> None:
    """list(x), tuple(x), deque(x): ``x`` a sized container."""
    _arity(args, kwargs, 1)
    for arg in args:
        _sized(guard, arg)


def _hashed_collection(guard: Guard, args: tuple, kwargs: dict) -> None:
    """set(x), frozenset(x): as :func:`_collection`, and every item is hashed."""
    _collection(guard, args, kwargs)
    for arg in args:
        for item in arg:
            guard.check_key(item)


def _mapping(guard: Guard, args: tuple, kwargs: dict) -> None:
    """dict(x), OrderedDict(x), Counter(x): a dict, or a sized container of keys or pairs."""
    _arity(args, {}, 1)
    for key in kwargs:
        guard.check_key(key)
    for arg in args:
        _sized(guard, arg)
        for item in arg:
            # dict(pairs) hashes each pair's first item; Counter(iterable) each item.
            pair = type(arg) is not dict and type(item) in (tuple, list) and item
            key = item[0] if pair else item
            guard.check_key(key)


def _defaultdict(guard: Guard, args: tuple, kwargs: dict) -> None:
    """defaultdict(factory, x): the factory is called later with no arguments, by the user."""
    if args and args[0] is not None:
        guard.require_class(args[0], "defaultdict factory")
    _mapping(guard, args[1:], kwargs)


def _deque(guard: Guard, args: tuple, kwargs: dict) -> None:
    _arity(args, kwargs, 2)
    _collection(guard, args[:1], {})
    if len(args) == 2 and args[1] is not None and type(args[1]) is not int:
        raise ValueError("maxlen must be an int or None")


def _bytes_source(guard: Guard, args: tuple, kwargs: dict) -> None:
    """bytes(x)/bytearray(x): never an int (that allocates x bytes); text only in a few codecs."""
    _arity(args, kwargs, 3)
    if not args:
        return
    source = args[0]
    if type(source) is str:
        _text_codec(args[1:2])
    elif type(source) not in (bytes, bytearray, list, tuple):
        raise ValueError(f"needs bytes, a list of ints or text, not {type(source).__name__}")
    guard.charge(len(source))


def _text_codec(encoding: tuple) -> None:
    # Looking a codec up by name may import encodings.<name>: only codecs already loaded.
    if len(encoding) != 1 or type(encoding[0]) is not str \
            or encoding[0].lower() not in _TEXT_CODECS:
        raise ValueError(f"encoding must be one of {sorted(_TEXT_CODECS)}")


def _codecs_encode(guard: Guard, args: tuple, kwargs: dict) -> None:
    _arity(args, kwargs, 2)
    if not args or type(args[0]) is not str:
        raise ValueError("encodes text only")
    _text_codec(args[1:])
    guard.charge(len(args[0]))


def _ints(guard: Guard, args: tuple, kwargs: dict) -> None:
    """range(...): ints only (no __index__ of anything else)."""
    _arity(args, kwargs, 3)
    if any(type(arg) is not int for arg in args):
        raise ValueError("takes ints only")


def _numbers_or_text(guard: Guard, args: tuple, kwargs: dict) -> None:
    """complex(...), Fraction(...): numbers or text, ints of bounded size (gcd is quadratic)."""
    _arity(args, kwargs, 2)
    for arg in args:
        if type(arg) not in (int, float, str, complex):
            raise ValueError(f"takes numbers or text, not {type(arg).__name__}")
        if type(arg) is int and arg.bit_length() > MAX_INT_BITS:
            raise ValueError(f"int of {arg.bit_length()} bits (at most {MAX_INT_BITS})")


def _texts(guard: Guard, args: tuple, kwargs: dict) -> None:
    """Path segments: text only (no __fspath__ of anything else)."""
    if kwargs or any(type(arg) is not str for arg in args):
        raise ValueError("takes text segments only")
    guard.charge(sum(map(len, args)))


def _reconstructor(guard: Guard, args: tuple, kwargs: dict) -> None:
    """copyreg._reconstructor(cls, base, state): ``base.__new__(cls, state)``, then, unless
    base is object, ``base.__init__(obj, state)``: both classes allowed, state as base's."""
    if len(args) != 3 or kwargs:
        raise ValueError("takes (cls, base, state)")
    cls, base, state = args
    guard.require_class(cls, "class")
    if base is object:
        if state is not None:
            raise ValueError("state must be None for base object")
        return
    guard.require_class(base, "base")
    guard.check_call(base, (state,), {})


def _newobj(guard: Guard, args: tuple, kwargs: dict) -> None:
    """copyreg.__newobj__(cls, *args): ``cls.__new__(cls, *args)``, checked as NEWOBJ is."""
    if not args or kwargs:
        raise ValueError("takes (cls, *args)")
    guard.require_class(args[0], "class")
    guard.check_call(args[0], args[1:], {})


def _newobj_ex(guard: Guard, args: tuple, kwargs: dict) -> None:
    if len(args) != 3 or kwargs or type(args[1]) is not tuple or type(args[2]) is not dict:
        raise ValueError("takes (cls, args, kwargs)")
    guard.require_class(args[0], "class")
    guard.check_call(args[0], args[1], args[2])


def _class_first(guard: Guard, args: tuple, kwargs: dict) -> None:
    """Functions whose first argument is the class they instantiate."""
    if not args or kwargs:
        raise ValueError("takes the class as its first argument")
    guard.require_class(args[0], "class")


def _empty_shape(guard: Guard, args: tuple, kwargs: dict) -> None:
    """numpy's _reconstruct(subtype, shape, dtype): numpy writes shape (0,), and BUILD's
    __setstate__ then sets the real shape against the data it is given. Any other shape
    would allocate memory the pickle did not pay for."""
    _class_first(guard, args, kwargs)
    if len(args) != 3 or type(args[1]) is not tuple or 0 not in args[1]:
        raise ValueError("takes (subtype, shape holding a 0, dtype)")


def _no_tz_files(guard: Guard, args: tuple, kwargs: dict) -> None:
    """pandas reads a time zone named "dateutil/<path>" (in a tz or a dtype) from that file:
    a pickle may not name one (a path like /dev/stdin would block the load)."""
    values = [*args, *kwargs.values()]
    values += [value for arg in args if type(arg) is dict for value in arg.values()]
    if any(type(value) is str and "dateutil" in value for value in values):
        raise ValueError("names a dateutil time zone file")


def _index(guard: Guard, args: tuple, kwargs: dict) -> None:
    """pandas' _new_Index(cls, d): ``cls.__new__(cls, **d)``; a list of tuples as data becomes
    a MultiIndex, which hashes every tuple: those hashes are charged first."""
    _class_first(guard, args, kwargs)
    _no_tz_files(guard, args, kwargs)
    if len(args) != 2 or type(args[1]) is not dict:
        raise ValueError("takes (cls, dict of its arguments)")
    for value in args[1].values():
        if type(value) in (list, tuple):
            guard.charge(len(value))
            for item in value:
                guard.check_key(item)


def _block_manager(guard: Guard, args: tuple, kwargs: dict) -> None:
    """pandas' BlockManager(blocks, axes): validates that the blocks fit the axes."""
    _arity(args, kwargs, 3)
    if len(args) < 2 or type(args[0]) not in (list, tuple) or type(args[1]) not in (list, tuple):
        raise ValueError("takes (blocks, axes)")
    guard.charge(len(args[0]) + len(args[1]))


def _datetime_index(guard: Guard, args: tuple, kwargs: dict) -> None:
    _class_first(guard, args, kwargs)
    _no_tz_files(guard, args, kwargs)


def _dtype(guard: Guard, args: tuple, kwargs: dict) -> None:
    """numpy.dtype(spec, align, copy): spec is text ('f8', 'V16', 'O8'), parsed by numpy."""
    _arity(args, kwargs, 3)
    if not args or type(args[0]) is not str:
        raise ValueError("takes a dtype code as text")


# -- the table -----------------------------------------------------------------------------

_ENUM = "an Enum lookup by value"
_NEW_ONLY = "never called; instances made empty by __new__ and filled by its __setstate__"

POLICY: dict[tuple[str, str], Rule] = {
    # builtins: containers and scalars.
    ("builtins", "set"): Rule(Use.CLASS, "a set of a sized container's items (each hash charged)",
                              _hashed_collection),
    ("builtins", "frozenset"): Rule(Use.CLASS, "as set", _hashed_collection),
    ("builtins", "list"): Rule(Use.CLASS, "a copy of a sized container", _collection),
    ("builtins", "tuple"): Rule(Use.CLASS, "a copy of a sized container", _collection),
    ("builtins", "dict"): Rule(Use.CLASS, "a dict from a mapping or pairs (each key's hash "
                               "charged)", _mapping),
    ("builtins", "bytearray"): Rule(Use.CLASS, "a copy of bytes, ints or latin-1/ASCII/UTF-8 text; "
                                    "never an int size", _bytes_source),
    ("builtins", "bytes"): Rule(Use.CLASS, "as bytearray", _bytes_source),
    ("builtins", "complex"): Rule(Use.CLASS, "parses a number or text", _numbers_or_text),
    ("builtins", "slice"): Rule(Use.CLASS, "stores its three arguments, calls nothing"),
    ("builtins", "range"): Rule(Use.CLASS, "a lazy range of ints; allocates nothing", _ints),
    ("builtins", "object"): Rule(Use.TYPE, "the base of copyreg._reconstructor for plain classes"),
    ("builtins", "Ellipsis"): Rule(Use.CONSTANT, "a value"),
    ("builtins", "NotImplemented"): Rule(Use.CONSTANT, "a value"),
    ("_codecs", "encode"): Rule(Use.FUNCTION, "text to bytes in latin-1/ASCII/UTF-8 (how protocols "
                                "0-2 write bytes)", _codecs_encode),
    # copyreg: how protocols 0-2 rebuild instances; only over allowed classes.
    ("copyreg", "_reconstructor"): Rule(Use.FUNCTION, "base.__new__(cls, state) and base.__init__; "
                                        "cls and base allowed, state checked as base's argument",
                                        _reconstructor),
    ("copyreg", "__newobj__"): Rule(Use.FUNCTION, "cls.__new__(cls, *args), checked as NEWOBJ",
                                    _newobj),
    ("copyreg", "__newobj_ex__"): Rule(Use.FUNCTION, "cls.__new__(cls, *args, **kwargs), checked "
                                       "as NEWOBJ_EX", _newobj_ex),
    # datetime: C constructors over ints, bytes and tzinfo objects (from allowed classes).
    ("datetime", "date"): Rule(Use.CLASS, "validates ints or a 4-byte state"),
    ("datetime", "time"): Rule(Use.CLASS, "validates ints or a 6-byte state and a tzinfo"),
    ("datetime", "datetime"): Rule(Use.CLASS, "validates ints or a 10-byte state and a tzinfo"),
    ("datetime", "timedelta"): Rule(Use.CLASS, "normalizes three numbers (range-checked)"),
    ("datetime", "timezone"): Rule(Use.CLASS, "stores a timedelta offset and a name"),
    # decimal, fractions, uuid: numbers parsed from text or ints.
    ("decimal", "Decimal"): Rule(Use.CLASS, "parses text or a digit tuple, linear in its size"),
    ("fractions", "Fraction"): Rule(Use.CLASS, "parses text or divides two ints by their gcd "
                                    f"(ints of at most {MAX_INT_BITS} bits)", _numbers_or_text),
    ("uuid", "UUID"): Rule(Use.TYPE, _NEW_ONLY),
    ("uuid", "SafeUUID"): Rule(Use.CLASS, _ENUM),
    # pathlib: paths are parsed text; constructing one touches no file.
    ("pathlib", "PurePath"): Rule(Use.CLASS, "parses text segments", _texts),
    ("pathlib", "PurePosixPath"): Rule(Use.CLASS, "parses text segments", _texts),
    ("pathlib", "PureWindowsPath"): Rule(Use.CLASS, "parses text segments", _texts),
    ("pathlib", "PosixPath"): Rule(Use.CLASS, "parses text segments; no file access", _texts),
    ("pathlib", "WindowsPath"): Rule(Use.CLASS, "parses text segments (fails off Windows)", _texts),
    # collections.
    ("collections", "OrderedDict"): Rule(Use.CLASS, "as dict", _mapping),
    ("collections", "Counter"): Rule(Use.CLASS, "counts a sized container's items or copies a "
                                     "mapping (each hash charged)", _mapping),
    ("collections", "deque"): Rule(Use.CLASS, "a copy of a sized container, int maxlen", _deque),
    ("collections", "defaultdict"): Rule(Use.CLASS, "as dict; its factory must be an allowed class "
                                         "(the user calls it later, with no arguments)",
                                         _defaultdict),
}

# numpy 2 names its modules numpy._core; numpy 1 (and pickles it wrote) numpy.core.
for _core in ("numpy._core", "numpy.core"):
    POLICY.update({
        (f"{_core}.multiarray", "_reconstruct"): Rule(
            Use.FUNCTION, "an empty array of an allowed ndarray class", _empty_shape),
        (f"{_core}.multiarray", "scalar"): Rule(
            Use.FUNCTION, "a numpy scalar from a dtype and its bytes (size-checked by numpy)"),
        (f"{_core}.numeric", "_frombuffer"): Rule(
            Use.FUNCTION, "an array viewing a buffer the pickle supplied (size-checked by numpy; "
            "no object dtype)"),
    })
POLICY.update({
    ("numpy", "dtype"): Rule(Use.CLASS, "parses a dtype code; fields come from its __setstate__",
                             _dtype),
    ("numpy", "ndarray"): Rule(Use.TYPE, "never called (a shape would allocate); filled by its "
                               "__setstate__, which checks the data against the shape"),
    # pandas 2: DataFrame, Series, Index, Categorical as pickle.dumps writes them.
    ("pandas", "DataFrame"): Rule(Use.TYPE, _NEW_ONLY),
    ("pandas", "Series"): Rule(Use.TYPE, _NEW_ONLY),
    ("pandas.core.internals.managers", "BlockManager"): Rule(
        Use.CLASS, "a frame's blocks over its axes, their shapes checked", _block_manager),
    ("pandas.core.internals.managers", "SingleBlockManager"): Rule(Use.TYPE, _NEW_ONLY),
    ("pandas._libs.internals", "_unpickle_block"): Rule(
        Use.FUNCTION, "a block over an array and a placement (an int array or a slice)"),
    ("pandas", "Index"): Rule(Use.TYPE, "only the class argument of _new_Index"),
    ("pandas", "RangeIndex"): Rule(Use.TYPE, "only the class argument of _new_Index"),
    ("pandas", "DatetimeIndex"): Rule(Use.TYPE, "only the class argument of _new_DatetimeIndex"),
    ("pandas.core.indexes.base", "_new_Index"): Rule(
        Use.FUNCTION, "cls.__new__(cls, **d) for an allowed index class (the hashes of "
        "a list of tuples as its data charged)", _index),
    ("pandas.core.indexes.datetimes", "_new_DatetimeIndex"): Rule(
        Use.FUNCTION, "a DatetimeIndex of an allowed class from its data (no tz file)",
        _datetime_index),
    ("pandas", "Categorical"): Rule(Use.TYPE, "only the class argument of the array unpickler"),
    ("pandas.arrays", "StringArray"): Rule(Use.TYPE, "only the class argument of the array "
                                           "unpickler"),
    ("pandas.arrays", "DatetimeArray"): Rule(Use.TYPE, "only the class argument of the array "
                                             "unpickler"),
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"): Rule(
        Use.FUNCTION, "cls.__new__(cls) and its __setstate__ for an allowed array class",
        _class_first),
    ("pandas", "CategoricalDtype"): Rule(Use.TYPE, _NEW_ONLY),
    ("pandas", "DatetimeTZDtype"): Rule(Use.TYPE, _NEW_ONLY + " (a fixed-offset tz object; "
                                        "named zones need allow=)"),
    ("pandas", "StringDtype"): Rule(Use.CLASS, "stores a storage name and a missing-value marker"),
    ("pandas._libs.tslibs.offsets", "Day"): Rule(Use.CLASS, "a day offset from an int and a flag"),
    ("pandas._libs.tslibs.timestamps", "_unpickle_timestamp"): Rule(
        Use.FUNCTION, "a Timestamp from an int, a frequency, a tz (no tz file) and a resolution",
        _no_tz_files),
    ("pandas._libs.tslibs.timedeltas", "_timedelta_unpickle"): Rule(
        Use.FUNCTION, "a Timedelta from an int and a resolution"),
})
del _core
