"""Differential tests of the pickler: pstore.engine must write the bytes CPython's pickle writes."""

from __future__ import annotations

import copyreg
import io
import math
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pstore import engine
from tests.engine import samples

PROTOCOLS = range(engine.HIGHEST_PROTOCOL + 1)
pytestmark = pytest.mark.usefixtures("engine_mode")   # C fast path and pure Python


def expect_same_bytes(obj, protocol, **kwargs):
    """Same bytes as CPython, or the same exception type where CPython refuses."""
    try:
        expected = pickle.dumps(obj, protocol, **kwargs)
    except Exception as error:
        with pytest.raises(type(error)):
            engine.dumps(obj, protocol, **kwargs)
        return
    got = engine.dumps(obj, protocol, **kwargs)
    assert got == expected, first_difference(expected, got)


def first_difference(expected: bytes, got: bytes) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
              min(len(expected), len(got)))
    return (f"first difference at offset {at} (lengths {len(expected)}, {len(got)}): "
            f"expected {expected[at - 16:at + 16]!r}, got {got[at - 16:at + 16]!r}")


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("obj", samples.all_samples(), ids=lambda o: type(o).__name__)
def test_same_bytes_as_cpython(obj, protocol):
    expect_same_bytes(obj, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("fix_imports", [True, False])
def test_python2_names(protocol, fix_imports):
    # range, str, bytes, OSError, functools.reduce and UserDict have other names in Python 2.
    import collections
    import functools
    obj = [range(3), str, bytes, bytearray(b"b"), OSError, functools.reduce,
           collections.UserDict(), ValueError("v"), "text", b"bytes"]
    expect_same_bytes(obj, protocol, fix_imports=fix_imports)


# Large payloads leave the frame they would overflow; memo indexes above 255 need the
# 4-byte memo opcodes; very long outputs span many frames.
LARGE = [
    b"x" * 70_000, "y" * 70_000, bytearray(b"z" * 70_000),
    [b"small", b"q" * 200_000, "after"],
    [str(i) for i in range(70_000)],
    {f"k{i}": [i, float(i), (i, "v")] for i in range(20_000)},
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("obj", LARGE, ids=lambda o: f"{type(o).__name__}{len(o)}")
def test_large_outputs_frames_and_memo(obj, protocol):
    expect_same_bytes(obj, protocol)
    stream = io.BytesIO()
    engine.dump(obj, stream, protocol)
    assert stream.getvalue() == pickle.dumps(obj, protocol)


# -- hypothesis: nested data of every builtin kind ---------------------------------------------

hashables = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    | st.binary(),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=5),
    max_leaves=10,
)
values = st.recursive(
    hashables | st.floats() | st.complex_numbers(allow_nan=False),
    lambda inner: (st.lists(inner, max_size=8) | st.tuples(inner) | st.tuples(inner, inner, inner)
                   | st.lists(inner, min_size=4, max_size=6).map(tuple)
                   | st.dictionaries(hashables, inner, max_size=8)
                   | st.sets(hashables, max_size=8) | st.binary().map(bytearray)),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.sampled_from(list(PROTOCOLS)))
def test_property_same_bytes(obj, protocol):
    expect_same_bytes(obj, protocol)


@settings(max_examples=25, deadline=None)
@given(st.integers(min_value=0, max_value=3000), st.sampled_from(list(PROTOCOLS)),
       st.sampled_from([list, tuple, dict, set, frozenset, str, bytes]))
def test_property_container_lengths(length, protocol, kind):
    if kind is dict:
        obj = {i: str(i) for i in range(length)}
    elif kind is str:
        obj = "é" * length
    elif kind is bytes:
        obj = bytes(length)
    else:
        obj = kind(range(length))
    expect_same_bytes(obj, protocol)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=3), max_size=30), st.sampled_from(list(PROTOCOLS)))
def test_property_shared_references(strings, protocol):
    # The same objects reached several times are written once and then referenced.
    shared_list = list(strings)
    obj = [shared_list, strings, shared_list, tuple(strings), strings]
    expect_same_bytes(obj, protocol)


# -- the pickler's hooks ---------------------------------------------------------------------

class Ref:
    def __init__(self, key):
        self.key = key


class StrSubclass(str):
    pass


def with_persistent_id(base):
    class PersistentPickler(base):
        def persistent_id(self, obj):
            if isinstance(obj, Ref):
                return ("ref", obj.key)
            if obj == "by-reference":
                return obj.upper()
            return None
    return PersistentPickler


def dump_with(pickler_class, obj, protocol, times=2, **kwargs):
    stream = io.BytesIO()
    pickler = pickler_class(stream, protocol, **kwargs)
    for _ in range(times):
        pickler.dump(obj)
    pickler.clear_memo()
    pickler.dump(obj)
    return stream.getvalue()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_id(protocol):
    obj = [Ref(1), Ref(2), "by-reference", {"nested": Ref(3)}, "plain"]
    expected = dump_with(with_persistent_id(pickle.Pickler), obj, protocol)
    assert dump_with(with_persistent_id(engine.Pickler), obj, protocol) == expected


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_id_not_asked_for_atoms_when_told(protocol):
    """persistent_id_for_atoms = False (a pstore addition): what the stdlib asks about,
    but str, int, float, bool and None -- and, for a persistent_id that returns None for
    those, the same bytes."""
    def asking(base, asked, for_atoms=True):
        class Asking(with_persistent_id(base)):
            persistent_id_for_atoms = for_atoms

            def persistent_id(self, obj):
                asked.append(type(obj))
                return None if type(obj) is str else super().persistent_id(obj)
        return Asking

    obj = [Ref(1), "text", 1, 2.5, True, None, (3,), {"k": Ref(2)}, StrSubclass("sub")]
    stdlib_asked: list = []
    asked: list = []
    expected = dump_with(asking(pickle.Pickler, stdlib_asked), obj, protocol, times=1)
    assert dump_with(asking(engine.Pickler, asked, False), obj, protocol, times=1) == expected
    atoms = (str, int, float, bool, type(None))
    assert asked == [kind for kind in stdlib_asked if kind not in atoms]
    assert StrSubclass in asked and len(asked) < len(stdlib_asked)


def test_persistent_id_protocol_0_must_be_ascii():
    class Pickler(engine.Pickler):
        def persistent_id(self, obj):
            return "é" if obj == 1 else None
    with pytest.raises(pickle.PicklingError, match="ASCII"):
        Pickler(io.BytesIO(), 0).dump([1])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_dispatch_table_instance_and_class_attribute(protocol):
    table = copyreg.dispatch_table.copy()
    table[Ref] = lambda ref: (Ref, (ref.key * 10,))
    obj = [Ref(4), complex(1, 2)]

    stdlib_stream, our_stream = io.BytesIO(), io.BytesIO()
    stdlib_pickler = pickle.Pickler(stdlib_stream, protocol)
    stdlib_pickler.dispatch_table = table
    stdlib_pickler.dump(obj)
    ours = engine.Pickler(our_stream, protocol)
    ours.dispatch_table = table
    ours.dump(obj)
    assert our_stream.getvalue() == stdlib_stream.getvalue()
    assert engine.loads(our_stream.getvalue()).__class__ is list

    class StdlibWithTable(pickle.Pickler):
        dispatch_table = table

    class OursWithTable(engine.Pickler):
        dispatch_table = table

    assert dump_with(OursWithTable, obj, protocol) == dump_with(StdlibWithTable, obj, protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reducer_override(protocol):
    def override(obj):
        if isinstance(obj, Ref):
            return (Ref, ("overridden",))
        if obj is samples.Plain:
            return (str, ("class replaced",))
        return NotImplemented

    class Stdlib(pickle.Pickler):
        def reducer_override(self, obj):
            return override(obj)

    class Ours(engine.Pickler):
        def reducer_override(self, obj):
            return override(obj)

    obj = [Ref(1), samples.Plain, 1, "s", [2], {"d": 3}, 2.5]
    assert dump_with(Ours, obj, protocol) == dump_with(Stdlib, obj, protocol)


@pytest.mark.parametrize("in_band", [lambda buf: False, lambda buf: True,
                                     lambda buf: len(buf.raw()) < 50, None])
def test_out_of_band_buffers(in_band):
    obj = [pickle.PickleBuffer(b"a" * 100), pickle.PickleBuffer(bytearray(b"b" * 10)),
           pickle.PickleBuffer(b"c" * 70_000), b"inline bytes"]
    seen_by_stdlib, seen_by_us = [], []

    def callback(seen):
        if in_band is None:
            return None
        return lambda buf: seen.append(buf) or in_band(buf)

    expected = pickle.dumps(obj, 5, buffer_callback=callback(seen_by_stdlib))
    got = engine.dumps(obj, 5, buffer_callback=callback(seen_by_us))
    assert got == expected
    assert [bytes(b.raw()) for b in seen_by_us] == [bytes(b.raw()) for b in seen_by_stdlib]


def test_picklebuffer_errors():
    with pytest.raises(pickle.PicklingError, match="protocol >= 5"):
        engine.dumps(pickle.PickleBuffer(b"x"), 4)
    strided = memoryview(bytearray(range(10)))[::2]
    with pytest.raises(pickle.PicklingError, match="non-contiguous"):
        engine.dumps(pickle.PickleBuffer(strided), 5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_extension_registry(protocol):
    import collections
    codes = [(collections.__name__, "OrderedDict", 240), ("collections", "deque", 70_000),
             ("builtins", "range", 300)]
    for module, name, code in codes:
        copyreg.add_extension(module, name, code)
    try:
        expect_same_bytes([collections.OrderedDict(), collections.deque(), range(2)], protocol)
    finally:
        for module, name, code in codes:
            copyreg.remove_extension(module, name, code)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fast_mode_writes_no_memo(protocol):
    obj = [[1, 2], "a", ("b", [3]), "a"]
    stdlib_stream, our_stream = io.BytesIO(), io.BytesIO()
    stdlib, ours = pickle.Pickler(stdlib_stream, protocol), engine.Pickler(our_stream, protocol)
    stdlib.fast = ours.fast = True
    stdlib.dump(obj)
    ours.dump(obj)
    assert our_stream.getvalue() == stdlib_stream.getvalue()
    cyclic = samples.recursive_list()
    with pytest.raises(ValueError, match="cyclic"):
        ours.dump(cyclic)


# -- errors ----------------------------------------------------------------------------------

def test_constructor_errors():
    with pytest.raises(ValueError, match="protocol must be <= 5"):
        engine.Pickler(io.BytesIO(), 6)
    with pytest.raises(ValueError, match="buffer_callback needs protocol >= 5"):
        engine.Pickler(io.BytesIO(), 4, buffer_callback=list.append)
    with pytest.raises(TypeError, match="write"):
        engine.Pickler(object())
    assert engine.dumps(1, -1) == pickle.dumps(1, -1)
    assert engine.dumps(1, None) == pickle.dumps(1)


def local_function_holder():
    def local():
        pass
    return local


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("bad", [lambda: 0, local_function_holder(), object.__new__(
    type("Unreachable", (), {}))], ids=["lambda", "local", "unreachable-class"])
def test_unpicklable_raises_picklingerror(bad, protocol):
    with pytest.raises(pickle.PicklingError):
        engine.dumps(bad, protocol)


def test_bad_reduce_values():
    class ReturnsNumber:
        def __reduce__(self):
            return 42

    class ReturnsShortTuple:
        def __reduce__(self):
            return (ReturnsShortTuple,)

    class NotCallable:
        def __reduce__(self):
            return (42, ())

    for bad, message in [(ReturnsNumber(), "string or tuple"),
                         (ReturnsShortTuple(), "2 through 6"),
                         (NotCallable(), "callable")]:
        with pytest.raises(pickle.PicklingError, match=message):
            engine.dumps(bad, 2)


def test_recursion_limit_is_an_exception():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecursionError):
        engine.dumps(deep)


def test_nan_and_signed_zero_bits():
    for protocol in PROTOCOLS:
        data = engine.dumps([math.nan, -0.0], protocol)
        assert data == pickle.dumps([math.nan, -0.0], protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bytes_dumper_shares_the_memo_with_dump(protocol):
    shared = ["shared", b"q" * 70_000]     # the bytes leave the frame: parts handed over early
    first, second = [shared, 1], [shared, 2]
    stdlib_stream = io.BytesIO()
    stdlib = pickle.Pickler(stdlib_stream, protocol)
    stdlib.dump(first)
    expected_first = stdlib_stream.getvalue()
    stdlib.dump(second)
    expected_second = stdlib_stream.getvalue()[len(expected_first):]

    stream = io.BytesIO()
    ours = engine.Pickler(stream, protocol)
    assert ours.bytes_dumper()(first) == expected_first
    assert stream.getvalue() == b""             # the bytes were returned, not written
    ours.dump(second)                           # the memo of the first dump is used
    assert stream.getvalue() == expected_second


class Unreducible:
    def __reduce__(self):
        raise ValueError("Unreducible refuses to be pickled")


@pytest.mark.parametrize("protocol", [2, 5])
def test_bytes_dumper_after_a_failed_dump_and_a_changed_hook(protocol):
    failing = [b"q" * 70_000, Unreducible()]    # fails after a part was handed over
    stdlib_stream = io.BytesIO()
    stdlib = pickle.Pickler(stdlib_stream, protocol)
    with pytest.raises(ValueError, match="refuses"):
        stdlib.dump(failing)
    after_failure = len(stdlib_stream.getvalue())
    stdlib.dump([1])
    stream = io.BytesIO()
    ours = engine.Pickler(stream, protocol)
    to_bytes = ours.bytes_dumper()
    with pytest.raises(ValueError, match="refuses"):
        to_bytes(failing)
    ours.dump([1])                              # goes to the file again, not to the parts
    assert stream.getvalue() == stdlib_stream.getvalue()[after_failure:]

    def override(obj):
        return (str, ("replaced",)) if isinstance(obj, Ref) else NotImplemented

    class Stdlib(pickle.Pickler):
        def reducer_override(self, obj):
            return override(obj)

    overridden = io.BytesIO()
    Stdlib(overridden, protocol).dump(Ref(1))
    ours.reducer_override = override
    ours.clear_memo()
    # A function made before the change keeps the hooks it was made for; a new one sees it.
    assert to_bytes(Ref(1)) == pickle.dumps(Ref(1), protocol)
    ours.clear_memo()
    assert ours.bytes_dumper()(Ref(1)) == overridden.getvalue()
