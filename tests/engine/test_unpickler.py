"""Tests of pstore.engine.unpickler, with CPython's C unpickler as the oracle."""

from __future__ import annotations

import collections
import copyreg
import datetime
import decimal
import fractions
import io
import pickle
import sys
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pstore.engine.unpickler import Unpickler, load, loads

PROTOCOLS = range(6)

# Every test twice: with the C fast path and in pure Python (conftest.py).
pytestmark = pytest.mark.usefixtures("engine_mode")


# -- Classes exercising every way an object can be reduced (module level: picklable) ----------

class Plain:
    def __init__(self, a=1):
        self.a = a

    def __eq__(self, other):
        return type(other) is type(self) and vars(other) == vars(self)


class Slotted:
    __slots__ = ("x", "y")

    def __init__(self, x=1, y=2):
        self.x, self.y = x, y

    def __eq__(self, other):
        return type(other) is type(self) and (self.x, self.y) == (other.x, other.y)


class SlottedWithDict(Plain):
    __slots__ = ("s",)

    def __init__(self):
        super().__init__(5)
        self.s = "slot"

    def __eq__(self, other):
        return super().__eq__(other) and self.s == other.s


class WithState(Plain):
    def __getstate__(self):
        return {"a": self.a, "extra": "state"}

    def __setstate__(self, state):
        self.__dict__.update(state)


class WithReduce:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return (WithReduce, self.args)

    def __eq__(self, other):
        return type(other) is WithReduce and other.args == self.args


class WithNewArgsEx:
    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.kwargs = args, kwargs
        return obj

    def __getnewargs_ex__(self):
        return self.args, self.kwargs

    def __eq__(self, other):
        return type(other) is type(self) and (other.args, other.kwargs) == (self.args, self.kwargs)


def _set_state(obj, state):
    obj.__dict__["via_setter"] = state


class WithStateSetter(Plain):
    def __reduce__(self):
        return (Plain, (self.a,), {"s": 1}, None, None, _set_state)


class ListSub(list):
    pass


class DictSub(dict):
    pass


class Extended(Plain):
    pass


class Recorder:
    """An object with only append/__setitem__/add, reduced with list/dict/set items."""

    def __init__(self):
        self.log = []

    def append(self, item):
        self.log.append(("append", item))

    def __setitem__(self, key, value):
        self.log.append(("set", key, value))

    def __reduce__(self):
        return (Recorder, (), None, iter([1, 2]), iter([("k", "v")]))

    def __eq__(self, other):
        return type(other) is Recorder and other.log == self.log


EXT_CODE = 0x7FF1
copyreg.add_extension(__name__, "Extended", EXT_CODE)


def _sample_objects():
    shared = [1, 2]
    recursive = []
    recursive.append(recursive)
    rec_dict = {}
    rec_dict["self"] = rec_dict
    return [
        None, True, False, 0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**31, 2**63,
        -2**63 - 1, 2**1000, -(2**2048) + 7, 0.0, -0.0, 1.5, float("inf"), -1e300,
        complex(1, 2), "", "a", "é\u20ac\U0001f600", "\ud800", "x" * 300, "line\nbreak\\",
        b"", b"\x00\xff", b"y" * 300, bytearray(b"ba"), bytearray(300), (), (1,), (1, 2),
        (1, 2, 3), (1, 2, 3, 4), [], [1, "a"], {}, {"a": 1, 2: [3]}, set(), {1, 2, 3},
        frozenset(), frozenset({"a"}), [shared, shared, (shared,)], recursive, rec_dict,
        Plain(3), Slotted(), SlottedWithDict(), WithState(7), WithReduce(1, "b"),
        WithNewArgsEx(1, k=2), WithStateSetter(4), ListSub([1, 2]), DictSub(a=1),
        Extended(9), Recorder(), collections.OrderedDict(a=1), collections.deque([1, 2]),
        datetime.datetime(2024, 1, 2, 3, 4, 5, 6), datetime.date(2020, 1, 1),
        decimal.Decimal("1.25"), fractions.Fraction(1, 3), SimpleNamespace(q=1), range(3),
        slice(1, 2), type(None), Ellipsis, NotImplemented, len, Plain, list(range(3000)),
        {i: str(i) for i in range(1500)}, set(range(2500)), tuple(range(1001)),
    ]


SAMPLES = _sample_objects()


def _shape(obj, seen=None):
    """A comparable description of ``obj`` that includes its sharing structure."""
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return ("ref", seen[id(obj)])
    seen[id(obj)] = len(seen)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [_shape(x, seen) for x in obj])
    if isinstance(obj, dict):
        return (type(obj).__name__, [(_shape(k, seen), _shape(v, seen)) for k, v in obj.items()])
    if isinstance(obj, float) and obj != obj:
        return ("nan",)
    if type(obj).__module__ == __name__ or isinstance(obj, SimpleNamespace):
        state = obj.__getstate__() if hasattr(obj, "__getstate__") else _state_of(obj)
        return (type(obj).__name__, _shape(state, seen))
    return (type(obj).__name__, repr(obj))


def _state_of(obj):
    """``__dict__`` and slot values: what ``object.__getstate__`` (Python 3.11+) returns."""
    slots = {name: getattr(obj, name) for cls in type(obj).__mro__
             for name in getattr(cls, "__slots__", ()) if hasattr(obj, name)
             and name != "__dict__"}
    return (getattr(obj, "__dict__", None), slots)


def assert_same_load(data: bytes, **kwargs) -> None:
    expected = pickle.loads(data, **kwargs)
    got = loads(data, **kwargs)
    assert _shape(got) == _shape(expected)


def _dumps_or_none(obj, proto):
    """The stdlib's pickle of ``obj``, or None where protocol ``proto`` cannot pickle it."""
    try:
        return pickle.dumps(obj, proto)
    except TypeError:  # e.g. __slots__ without __getstate__ below protocol 2
        return None


@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_loads_matches_stdlib(proto, index):
    data = _dumps_or_none(SAMPLES[index], proto)
    if data is None:
        pytest.skip("not picklable with this protocol")
    assert_same_load(data)
    assert_same_load(pickle.dumps([SAMPLES[index]] * 2, proto))  # shared references


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_containers_of_every_length(proto):
    for n in list(range(0, 40)) + [999, 1000, 1001, 2000, 2999, 3000]:
        obj = ([str(i) for i in range(n)], {i: i for i in range(n)}, set(range(n)),
               frozenset(range(n)), tuple(range(n)), bytes(n), "s" * n)
        assert_same_load(pickle.dumps(obj, proto))


# -- Property tests --------------------------------------------------------------------------

_atoms = (st.none() | st.booleans() | st.integers() | st.integers(-2**80, 2**80)
          | st.floats(allow_nan=False) | st.text() | st.binary()
          | st.complex_numbers(allow_nan=False))
_data = st.recursive(
    _atoms,
    lambda children: (st.lists(children) | st.tuples(children, children)
                      | st.dictionaries(st.text() | st.integers(), children)
                      | st.frozensets(st.integers() | st.text())
                      | st.builds(bytearray, st.binary())),
    max_leaves=30,
)


@pytest.mark.parametrize("proto", PROTOCOLS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=_data)
def test_property_roundtrip(proto, obj):
    data = pickle.dumps([obj, obj], proto)
    assert_same_load(data)


# -- Options ---------------------------------------------------------------------------------

def test_persistent_ids():
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("pid", obj[1:]) if isinstance(obj, str) and obj.startswith("@") else None

    class U(Unpickler):
        def persistent_load(self, pid):
            return ("loaded", pid)

    class StdU(pickle.Unpickler):
        persistent_load = U.persistent_load

    for proto in PROTOCOLS:
        buf = io.BytesIO()
        P(buf, proto).dump(["@a", "b", "@a"])
        data = buf.getvalue()
        got = U(io.BytesIO(data)).load()
        assert got == StdU(io.BytesIO(data)).load()
        assert got[0][0] == "loaded"
        with pytest.raises(pickle.UnpicklingError):
            loads(data)


def test_out_of_band_buffers_are_zero_copy():
    big = bytearray(b"z" * 1000)
    ro = bytes(b"r" * 1000)
    buffers = []
    data = pickle.dumps([pickle.PickleBuffer(big), pickle.PickleBuffer(ro)], 5,
                        buffer_callback=buffers.append)
    got = loads(data, buffers=buffers)
    assert got[0] is buffers[0] and got[1] is buffers[1]  # the very objects given
    assert _shape(got) == _shape(pickle.loads(data, buffers=buffers))
    # A writable buffer where the pickle wants a read-only one: a read-only view of it.
    given = [bytearray(b"w" * 1000), bytearray(b"r" * 1000)]
    got = loads(data, buffers=given)
    assert got[0] is given[0]
    assert got[1].readonly and got[1].obj is given[1]
    given[1][0] = ord("!")
    assert got[1][0] == ord("!")
    with pytest.raises(pickle.UnpicklingError, match="NEXT_BUFFER at offset"):
        loads(data)
    with pytest.raises(pickle.UnpicklingError, match="not enough out-of-band buffers"):
        loads(data, buffers=buffers[:1])


def test_encoding_of_python2_strings():
    py2_str = b"S'caf\\xe9'\np0\n."
    py2_bin = b"U\x04caf\xe9."
    for data in (py2_str, py2_bin, b"T\x04\x00\x00\x00caf\xe9."):
        for kwargs in ({"encoding": "latin1"}, {"encoding": "bytes"},
                       {"encoding": "ascii", "errors": "replace"}):
            assert loads(data, **kwargs) == pickle.loads(data, **kwargs)
        with pytest.raises(UnicodeDecodeError):
            loads(data)
    dt = b"cdatetime\ndatetime\np0\n(S'\\x07\\xe4\\x01\\x02\\x03\\x04\\x05\\x00\\x00\\x06'\ntR."
    assert loads(dt, encoding="latin1") == pickle.loads(dt, encoding="latin1")
    assert loads(dt, encoding="bytes") == pickle.loads(dt, encoding="bytes")


def test_fix_imports():
    data = b"\x80\x02c__builtin__\nset\nq\x00]q\x01K\x01a\x85q\x02Rq\x03."
    assert loads(data) == pickle.loads(data) == {1}
    with pytest.raises(ModuleNotFoundError):
        loads(data, fix_imports=False)
    assert loads(b"cUserDict\nUserDict\n.") is collections.UserDict


# -- Malformed input -------------------------------------------------------------------------

def _outcome(func, data):
    try:
        func(data)
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return type(exc)
    return None


def _malformed_corpus():
    objs = [SAMPLES[i] for i in range(0, len(SAMPLES) - 6)]
    return [data for proto in PROTOCOLS for obj in objs
            if (data := _dumps_or_none(obj, proto)) is not None]


CORPUS = _malformed_corpus()


def _same_failure(c_type, ours) -> bool:
    """Whether pstore failed (or not) like the C unpickler did on the same bytes.

    The one accepted difference: where the C unpickler allocates what the data declares --
    a huge length, or a memo array up to a huge LONG_BINPUT index -- and fails with
    MemoryError, pstore allocates nothing: it reports the length as truncated data, or
    carries on with its dict memo and succeeds or fails later, on what follows.
    """
    return c_type is MemoryError or ours is c_type


def test_every_truncation_raises_like_c():
    for data in CORPUS[::3]:
        for cut in range(len(data) - 1, -1, -max(1, len(data) // 40)):
            piece = data[:cut]
            c_type = _outcome(pickle.loads, piece)
            assert c_type is not None
            with pytest.raises(Exception) as info:
                loads(piece)
            assert _same_failure(c_type, info.type), (piece, info.value)
            if info.type in (pickle.UnpicklingError, EOFError):
                assert "offset" in str(info.value)


@settings(max_examples=400, deadline=None)
@given(index=st.integers(0, len(CORPUS) - 1), edits=st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=3))
def test_mutated_pickles_raise_like_c(index, edits):
    data = bytearray(CORPUS[index])
    for where, byte in edits:
        data[where % len(data)] = byte
    data = bytes(data)
    c_type = _outcome(pickle.loads, data)
    ours = _outcome(loads, data)
    assert _same_failure(c_type, ours), (data, c_type, ours)


@pytest.mark.parametrize("data", [
    b"\x8e" + (2**62).to_bytes(8, "little") + b"abc",
    b"\x8d" + (2**62).to_bytes(8, "little") + b"abc",
    b"\x96" + (2**62).to_bytes(8, "little") + b"abc",
    b"\x95" + (2**62).to_bytes(8, "little") + b"N.",
    b"B\xff\xff\xff\x7fabc",
])
def test_hostile_lengths_fail_fast(data):
    with pytest.raises(pickle.UnpicklingError, match="truncated.*offset 0"):
        loads(data)

    class Reader(io.RawIOBase):  # a non-seekable file that records its read sizes
        def __init__(self, payload):
            self.inner, self.sizes = io.BytesIO(payload), []

        def readable(self):
            return True

        def read(self, n=-1):
            self.sizes.append(n)
            return self.inner.read(n)

        def readline(self, limit=-1):
            return self.inner.readline(limit)

    reader = Reader(data)
    with pytest.raises(pickle.UnpicklingError, match="truncated"):
        load(reader)
    assert max(reader.sizes) <= 1 << 20


def _list_depth(value):
    """How many lists are nested in ``value``, each the first item of the one around it."""
    depth = 0
    while type(value) is list:
        depth += 1
        value = value[0] if value else None
    return depth


def test_deep_nesting_does_not_crash():
    # 100,000 levels cost no recursion: each loads to what CPython's unpickler makes of it.
    marks_then_none = b"(" * 100_000 + b"N."
    assert loads(marks_then_none) is None is pickle.loads(marks_then_none)
    for data in (b"]" * 100_000 + b"a" * 99_999 + b".",    # EMPTY_LIST, APPEND into the one below
                 b"(" * 100_000 + b"l" * 100_000 + b"."):  # MARK ... LIST, innermost first
        result = loads(data)
        assert _list_depth(result) == 100_000 == _list_depth(pickle.loads(data))
        del result


def test_errors_name_opcode_and_offset():
    data = b"\x80\x04X\xa0\x0f\x00\x00" + b"a" * 12
    with pytest.raises(pickle.UnpicklingError,
                       match="BINUNICODE at offset 2 declares 4000 bytes, 12 remain"):
        loads(data)
    with pytest.raises(EOFError, match="Ran out of input"):
        loads(b"")
    with pytest.raises(ValueError, match="unsupported pickle protocol"):
        loads(b"\x80\x09.")
    with pytest.raises(ZeroDivisionError) as info:
        loads(b"cbuiltins\ndivmod\n(K\x01K\x00tR.")
    if sys.version_info >= (3, 11):
        assert "REDUCE at offset" in info.value.__notes__[0]


# -- find_class -------------------------------------------------------------------------------

class Refusing(Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused {module}.{name}")


@pytest.mark.parametrize("data", [
    pickle.dumps(Plain, 0),                      # GLOBAL
    pickle.dumps(Plain, 4),                      # STACK_GLOBAL
    b"(cbuiltins\nobject\no.",                   # OBJ, after GLOBAL
    b"(ibuiltins\nobject\n.",                    # INST
    pickle.dumps(Extended(1), 2),                # EXT2
])
def test_find_class_override_blocks_every_global(data):
    copyreg._extension_cache.clear()
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        Refusing(io.BytesIO(data)).load()


def test_find_class_audits():
    events = []
    sys.addaudithook(lambda event, args: events.append(args) if event == "pickle.find_class"
                     else None)
    loads(pickle.dumps(Plain, 4))
    assert (__name__, "Plain") in events


# -- Files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("proto", PROTOCOLS)
@pytest.mark.parametrize("kind", ["bytesio", "buffered", "nonseekable"])
def test_several_pickles_from_one_file(tmp_path, proto, kind):
    objs = [SAMPLES[i] for i in (5, 27, 44, 60)] + [list(range(70000)), "x" * 100_000]
    pickles = [pickle.dumps(obj, proto) for obj in objs]
    raw = b"".join(pickles) + b"tail"
    if kind == "bytesio":
        file = io.BytesIO(raw)
    elif kind == "buffered":
        path = tmp_path / "p"
        path.write_bytes(raw)
        file = open(path, "rb")  # noqa: SIM115
    else:
        file = io.BufferedReader(io.BytesIO(raw))
        file.seekable = lambda: False
    with file:
        unpickler = Unpickler(file)
        for data in pickles:
            assert _shape(unpickler.load()) == _shape(pickle.loads(data))
        assert file.read() == b"tail"


def test_each_pickle_in_a_file_has_its_own_protocol():
    # fix_imports applies below protocol 3: the second pickle must not inherit the first's.
    raw = pickle.dumps(1, 3) + b"c__builtin__\nset\n."
    unpickler = Unpickler(io.BytesIO(raw))
    assert unpickler.load() == 1
    assert unpickler.load() is set


def test_file_without_read_or_readline():
    with pytest.raises(TypeError):
        Unpickler(object())
    with pytest.raises(TypeError):
        Unpickler(SimpleNamespace(read=lambda n: b""))


def test_loads_accepts_any_bytes_like():
    data = pickle.dumps({"a": [1, 2]}, 5)
    for form in (bytearray(data), memoryview(data)):
        assert loads(form) == {"a": [1, 2]}


# -- load_bytes -------------------------------------------------------------------------------

def test_load_bytes_reads_each_pickle_on_its_own():
    unpickler = Unpickler(io.BytesIO())
    memo = unpickler.memo
    for data in CORPUS:
        assert _shape(unpickler.load_bytes(data)) == _shape(pickle.loads(data))
        assert unpickler.memo is memo and not memo   # nothing of the pickle is kept
    data = pickle.dumps([pickle.PickleBuffer(bytearray(b"z" * 100))], 5,
                        buffer_callback=(buffers := []).append)
    assert unpickler.load_bytes(data, buffers)[0] is buffers[0]
    with pytest.raises(pickle.UnpicklingError, match="NEXT_BUFFER at offset"):
        unpickler.load_bytes(data)


def test_load_bytes_nests_through_persistent_load():
    # The outer pickle (protocol 2) refers to an inner one (protocol 5) loaded by the same
    # unpickler; afterwards the outer one still has its own memo (the BINGET of `shared`)
    # and its own protocol (fix_imports maps __builtin__.set only below protocol 3).
    inner = pickle.dumps({"inner": [1, 2]}, 5)

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "inner" if obj == "@inner" else None

    class U(Unpickler):
        def persistent_load(self, pid):
            return self.load_bytes(inner)

    shared = ["shared"]
    buf = io.BytesIO()
    P(buf, 2).dump([shared, "@inner", shared, set])
    got = U(io.BytesIO()).load_bytes(buf.getvalue())
    assert got == [shared, {"inner": [1, 2]}, shared, set]
    assert got[0] is got[2]


def test_load_bytes_at_reads_pickles_one_after_the_other():
    first, second = pickle.dumps([1, "a"], 5), pickle.dumps({"b": (2,)}, 2)
    data = first + second
    unpickler = Unpickler(io.BytesIO())
    value, end = unpickler.load_bytes_at(data, 0)
    assert value == [1, "a"] and end == len(first)
    assert unpickler.load_bytes_at(data, end) == ({"b": (2,)}, len(data))
    # Offsets in messages count from the pickle's start.
    with pytest.raises(pickle.UnpicklingError, match="offset 0"):
        unpickler.load_bytes_at(data + b"\xee", len(data))
