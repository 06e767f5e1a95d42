"""Restricted loading of data: what the data policy admits loads equal to the stdlib's
result, in both unpickler modes; what ``allow=`` adds; what a refusal says."""

from __future__ import annotations

import io
import pathlib
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest

from pstore.engine import (
    RestrictedUnpickler,
    RestrictedUnpicklingError,
    dumps,
    globals_of,
    restricted_loads,
)
from pstore.engine.policy import POLICY, Use

from . import samples

pytestmark = pytest.mark.usefixtures("engine_mode")

PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


def plain_data() -> list[Any]:
    """What the data policy promises to load: builtins, containers, the stdlib's data types."""
    stdlib = [value for value in samples.stdlib_values()
              if type(value).__module__ in ("datetime", "decimal", "fractions", "collections",
                                            "uuid", "builtins")
              and not callable(value) and value is not NotImplemented]
    return [*samples.scalars(), *samples.containers_of_every_length(), *stdlib,
            samples.shared(), samples.recursive_list(), samples.recursive_dict(),
            {(1, "a"): frozenset({(2, 3)}), frozenset({1}): [{1, 2}]},
            pathlib.PurePosixPath("a/b"), pathlib.PureWindowsPath("c:/x"), Path("rel"),
            bytearray(b"abc"), slice(1, 2), range(5), ..., {"nested": [[[1]], ((2,),)]}]


def same(a: Any, b: Any) -> bool:
    return pickle.dumps(a, 4) == pickle.dumps(b, 4)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plain_data_loads_as_the_stdlib_loads_it(protocol: int) -> None:
    for value in plain_data():
        data = pickle.dumps(value, protocol)
        assert same(restricted_loads(data), pickle.loads(data)), value


def test_objects_load_when_their_module_is_allowed() -> None:
    for value in samples.objects():
        data = dumps(value, 4)
        if any(module == "tests.engine.samples" for module, _ in globals_of(data)):
            with pytest.raises(RestrictedUnpicklingError):
                restricted_loads(data)
        assert same(restricted_loads(data, allow=["tests.engine.samples.*"]), value)


def test_an_allowed_name_admits_that_class_only() -> None:
    data = dumps([samples.Plain(), samples.Slotted()], 2)
    with pytest.raises(RestrictedUnpicklingError) as refused:
        restricted_loads(data, allow=["tests.engine.samples.Plain"])
    assert refused.value.global_name == "tests.engine.samples.Slotted"
    loaded = restricted_loads(data, allow=["tests.engine.samples.Plain",
                                           "tests.engine.samples.Slotted"])
    assert loaded[0] == samples.Plain()


def test_a_nested_class_is_allowed_by_its_qualified_name() -> None:
    data = dumps(samples.Outer.Inner.Deepest(), 4)
    loaded = restricted_loads(data, allow=["tests.engine.samples.Outer.Inner.Deepest"])
    assert type(loaded) is samples.Outer.Inner.Deepest


def test_allow_star_is_the_full_unpickler() -> None:
    for value in samples.all_samples():
        data = dumps(value, 4)
        assert same(restricted_loads(data, allow="*"), pickle.loads(data))


@pytest.mark.parametrize("allow", ["os.system", ["os"], ["*.system"], [3]])
def test_allow_takes_a_list_of_dotted_names(allow: Any) -> None:
    with pytest.raises((TypeError, ValueError)):
        restricted_loads(b"N.", allow=allow)


def test_a_refusal_names_the_global_the_opcode_the_offset_and_how_to_allow_it() -> None:
    data = dumps([1, samples.Plain()], 2)
    with pytest.raises(pickle.UnpicklingError) as refused:
        restricted_loads(data)
    error = refused.value
    assert isinstance(error, RestrictedUnpicklingError)
    offset = data.index(b"ctests.engine.samples")
    assert (error.global_name, error.opcode, error.offset) == \
        ("tests.engine.samples.Plain", "GLOBAL", offset)
    text = str(error)
    assert "tests.engine.samples.Plain" in text and f"GLOBAL at offset {offset}" in text
    assert "allow=['tests.engine.samples.Plain']" in text
    assert "allow=['tests.engine.samples.*']" in text
    copy = pickle.loads(pickle.dumps(error))     # the facts travel with it
    assert copy.args == error.args and str(copy) == text


def test_find_class_alone_refuses_without_a_location() -> None:
    unpickler = RestrictedUnpickler(io.BytesIO(b""))
    assert unpickler.find_class("builtins", "set") is set
    with pytest.raises(RestrictedUnpicklingError) as refused:
        unpickler.find_class("builtins", "eval")
    assert refused.value.args == (refused.value.reason, "builtins", "eval", None, None)


def test_the_hint_for_a_nested_name_names_its_module() -> None:
    data = b"\x80\x04\x8c\x08builtins\x8c\x0cset.__init__\x93."
    with pytest.raises(RestrictedUnpicklingError) as refused:
        restricted_loads(data)
    assert refused.value.global_name == "builtins.set.__init__"
    assert "allow=['builtins.*']" in str(refused.value)


def test_copyreg_newobj_loads_over_an_allowed_class() -> None:
    data = b"ccopyreg\n__newobj__\n(cbuiltins\nfrozenset\n(lp0\nI1\natR."
    assert restricted_loads(data) == pickle.loads(data) == frozenset({1})
    hostile = data.replace(b"(lp0\nI1\na", b"cbuiltins\nrange\n(I0\nI99999999999\ntR")
    with pytest.raises(RestrictedUnpicklingError, match="range"):
        restricted_loads(hostile)


def test_python2_names_are_mapped_before_the_policy_is_consulted() -> None:
    assert restricted_loads(b"c__builtin__\nset\n((lp0\nI1\natR.") == {1}
    assert restricted_loads(b"c__builtin__\nxrange\n(I0\nI3\nI1\ntR.") == range(3)
    with pytest.raises(RestrictedUnpicklingError, match="builtins.eval"):
        restricted_loads(b"c__builtin__\neval\n(S'1'\ntR.")


def test_every_policy_rule_is_listed_with_what_it_reaches() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "safety.md").read_text()
    for (module, name), rule in POLICY.items():
        assert rule.reach and isinstance(rule.use, Use), (module, name)
        assert f"| `{module}.{name}` | {rule.use.value} | {rule.reach} |" in page, (module, name)


def test_a_subclass_may_handle_persistent_ids() -> None:
    class WithIds(RestrictedUnpickler):
        def persistent_load(self, pid: Any) -> Any:
            return ("ref", pid)

    data = b"(Pfirst\nI2\nl."
    assert WithIds(io.BytesIO(data)).load() == [("ref", "first"), 2]
    with pytest.raises(RestrictedUnpicklingError, match="persistent id") as refused:
        restricted_loads(data)
    assert (refused.value.opcode, refused.value.offset) == ("PERSID", 1)


def test_a_file_is_read_as_the_full_unpickler_reads_it() -> None:
    first, second = dumps({1, 2}, 2), dumps(frozenset("ab"), 4)
    unpickler = RestrictedUnpickler(io.BufferedReader(io.BytesIO(first + second)))
    assert unpickler.load() == {1, 2}
    assert unpickler.load() == frozenset("ab")


def numpy_values() -> list[Any]:
    np = pytest.importorskip("numpy")
    return [np.arange(12.0).reshape(3, 4), np.arange(6).reshape(2, 3).T,
            np.array([1, "a", None], dtype=object), np.zeros(0), np.float64(1.5), np.int32(-3),
            np.bool_(True), np.dtype(">i4"), np.dtype([("a", "i4"), ("b", "f8", (2,))]),
            np.zeros(3, dtype=[("a", "i4"), ("b", "U3")]), np.datetime64("2020-01-01"),
            np.array(["2020-01-01"], dtype="M8[ns]"), np.asfortranarray(np.ones((2, 3)))]


def pandas_values() -> list[Any]:
    pd = pytest.importorskip("pandas")
    return [pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "c": pd.Categorical(["u", "v"]),
                          "d": pd.to_datetime(["2020-01-01", "2021-06-01"]), "e": [0.5, None]}),
            pd.Series([1.0, 2.0], index=["a", "b"], name="n"), pd.Index([1, 2, 3]),
            pd.Index(["p", "q"]), pd.Categorical(["a", "b", "a"]), pd.RangeIndex(5),
            pd.date_range("2020", periods=3), pd.Timestamp("2020-01-01"), pd.Timedelta(1),
            pd.date_range("2020", periods=3, tz="UTC"), pd.Timestamp("2020-01-01", tz="UTC"),
            pd.DataFrame({"x": range(1000)}, index=pd.date_range("2000", periods=1000))]


def equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if hasattr(a, "equals"):
        return bool(a.equals(b))
    np = sys.modules["numpy"]
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and \
            a.flags.f_contiguous == b.flags.f_contiguous and bool(np.array_equal(a, b))
    if type(a).__name__ == "Categorical":
        return bool(a.equals(b))
    return bool(a == b)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_numpy_and_pandas_values_load_equal(protocol: int) -> None:
    for value in numpy_values() + pandas_values():
        data = pickle.dumps(value, protocol)
        assert equal(restricted_loads(data), value), (protocol, value)


def test_out_of_band_buffers_load_equal_and_are_not_copied() -> None:
    np = pytest.importorskip("numpy")
    for value in numpy_values() + pandas_values():
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(value, 5, buffer_callback=buffers.append)
        assert equal(restricted_loads(data, buffers=buffers), value), value
    array = np.arange(1000.0)
    buffers = []
    data = pickle.dumps(array, 5, buffer_callback=buffers.append)
    loaded = restricted_loads(data, buffers=buffers)
    assert np.shares_memory(loaded, array)


def test_a_time_zone_file_is_not_named() -> None:
    pytest.importorskip("pandas")
    # _unpickle_timestamp(0, None, "dateutil//dev/stdin", 9): pandas would read the "zone file".
    def text(value: str) -> bytes:
        return b"\x8c" + bytes([len(value)]) + value.encode()
    hostile = (b"\x80\x04" + text("pandas._libs.tslibs.timestamps")
               + text("_unpickle_timestamp") + b"\x93(J\x00\x00\x00\x00N"
               + text("dateutil//dev/stdin") + b"K\ttR.")
    with pytest.raises(RestrictedUnpicklingError, match="dateutil"):
        restricted_loads(hostile)


def test_numpy_refuses_a_shape_the_pickle_did_not_pay_for() -> None:
    pytest.importorskip("numpy")
    hostile = (b"\x80\x04\x8c\x16numpy._core.multiarray\x8c\x0c_reconstruct\x93"
               b"\x8c\x05numpy\x8c\x07ndarray\x93J\x00\x00\x00\x40J\x00\x00\x00\x40\x86C\x01b"
               b"\x87R.")
    with pytest.raises(RestrictedUnpicklingError, match="shape") as refused:
        restricted_loads(hostile)
    assert refused.value.opcode == "REDUCE"


def test_an_allowed_module_does_not_lend_its_imports() -> None:
    # samples imports collections, copyreg, re...: "samples.*" allows none of their globals.
    for name in ["copyreg._reconstructor", "re.compile", "collections",
                 "Plain.__init__.__globals__"]:
        data = b"\x80\x04\x8c\x14tests.engine.samples" + b"\x8c" + bytes([len(name)]) \
            + name.encode() + b"\x93."
        with pytest.raises(RestrictedUnpicklingError, match="module|special"):
            restricted_loads(data, allow=["tests.engine.samples.*"])


def test_a_nested_restricted_load_keeps_the_outer_budget() -> None:
    inner = dumps({(1, 2, 3): [1]}, 4)

    class Nested(RestrictedUnpickler):
        def persistent_load(self, pid: Any) -> Any:
            return self.load_bytes(inner)

    data = b"\x80\x04(" + b"\x8c\x01xQ" * 3 + b"l."
    assert Nested(io.BytesIO(data)).load() == [{(1, 2, 3): [1]}] * 3
