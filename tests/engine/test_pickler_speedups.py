"""The pickler's C fast path, pstore.engine._pickler_speedups.

test_pickler.py runs every dump in both modes (conftest.py), against the stdlib. Here:
the C and pure-Python picklers write the same bytes as each other and as the stdlib
around every batch, frame and memo boundary; objects C hands back to Python, and hooks
that change what is being pickled, cannot crash it; it leaks nothing; the store's
question "is this container a record?" is answered without calling persistent_id; and
without the compiled modules pstore runs in pure Python with the same results.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import io
import os
import pickle
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pstore import engine
from pstore.engine import pickler

speedups = engine._pickler_speedups
needs_speedups = pytest.mark.skipif(speedups is None, reason="_pickler_speedups is not built")
PROTOCOLS = range(engine.HIGHEST_PROTOCOL + 1)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def accelerated(enabled: bool) -> Iterator[None]:
    engine.use_accelerators(enabled)
    try:
        yield
    finally:
        engine.use_accelerators()


def dumps_both(obj: Any, protocol: int, pickler_class: type = engine.Pickler) -> bytes:
    """The pickle of obj in C and in pure Python, asserted equal byte for byte."""
    written = []
    for enabled in (True, False):
        with accelerated(enabled):
            stream = io.BytesIO()
            pickler_class(stream, protocol).dump(obj)
            written.append(stream.getvalue())
    assert written[0] == written[1], f"C and pure Python differ at protocol {protocol}"
    return written[0]


@needs_speedups
def test_every_container_length_to_3000() -> None:
    """Batches of 1000 (APPENDS, SETITEMS, ADDITEMS), in C, as the stdlib writes them."""
    with accelerated(True):
        for length in range(3001):
            items = list(range(length))
            for obj in (items, tuple(items), dict.fromkeys(items, None), set(items)):
                assert engine.dumps(obj, 5) == pickle.dumps(obj, 5), (type(obj), length)


@needs_speedups
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_lengths_around_batch_boundaries_c_and_python(protocol: int) -> None:
    for length in [*range(5), *range(997, 1004), *range(1997, 2004), *range(2996, 3001)]:
        items = [str(i) for i in range(length)]
        for obj in (items, tuple(items), dict(zip(items, range(length), strict=True)), set(items),
                    frozenset(items)):
            assert dumps_both(obj, protocol) == pickle.dumps(obj, protocol), (type(obj), length)


@needs_speedups
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_frame_and_memo_boundaries_c_and_python(protocol: int) -> None:
    target = 64 * 1024   # opcodes.FRAME_SIZE_TARGET
    values = [
        # payloads just under, at and over the frame size: inside or outside the frame
        *(kind(b"x" * size) for size in (target - 1, target, target + 1)
          for kind in (bytes, bytearray)),
        *("s" * size for size in (target - 1, target, target + 1)),
        ["é" * 21845, "é" * 21846, "ab"],        # 65535 and 65538 bytes of UTF-8
        # many small objects: frames end between objects, at every kind of object
        [(i, str(i), float(i), [i], {i: b"v"}) for i in range(20_000)],
        # memo indexes around 256 (BINPUT/LONG_BINPUT, BINGET/LONG_BINGET)
        [str(i) for i in range(300)] * 2,
        [[[i] for i in range(254, 258)]] * 2,
        # ints at every width
        [0, 255, 256, 65535, 65536, -1, 2**31 - 1, 2**31, -2**31, -2**31 - 1, 2**63 - 1,
         -2**63, 2**63, -2**63 - 1, 2**64, -2**64, 2**70, -128, -129, 127, 128],
    ]
    for obj in values:
        assert dumps_both(obj, protocol) == pickle.dumps(obj, protocol)


shared_pool = st.lists(st.text(max_size=4) | st.binary(max_size=4), min_size=1, max_size=5)


def with_shared(pool: list, shape: Any) -> Any:
    """Replace each int in shape by an object of pool, so objects recur (memo hits)."""
    if isinstance(shape, int) and not isinstance(shape, bool):
        return pool[shape % len(pool)]
    if isinstance(shape, list):
        return [with_shared(pool, item) for item in shape]
    if isinstance(shape, tuple):
        return tuple(with_shared(pool, item) for item in shape)
    return shape


plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary()
    | st.binary().map(bytearray),
    lambda inner: (st.lists(inner, max_size=6) | st.tuples(inner) | st.tuples(inner, inner)
                   | st.lists(inner, min_size=4, max_size=5).map(tuple)
                   | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=6)
                   | st.frozensets(st.integers(), max_size=4)),
    max_leaves=30,
)


@needs_speedups
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plain, shared_pool, st.recursive(st.integers(0, 9), lambda inner: st.lists(inner)
                                       | st.tuples(inner, inner), max_leaves=12),
       st.sampled_from(list(PROTOCOLS)))
def test_property_c_python_and_stdlib_agree(value: Any, pool: list, shape: Any,
                                           protocol: int) -> None:
    obj = [value, with_shared(pool, shape), value]
    assert dumps_both(obj, protocol) == pickle.dumps(obj, protocol)


def containers_in(value: Any) -> list[Any]:
    """Every list, tuple, dict, frozenset and bytes object reachable from value, once each."""
    found: dict[int, Any] = {}
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) in (list, tuple, dict, frozenset, bytes, bytearray) and id(item) not in found:
            found[id(item)] = item
            if isinstance(item, dict):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif not isinstance(item, (bytes, bytearray)):
                stack.extend(item)
    return list(found.values())


@needs_speedups
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plain, st.sets(st.integers(0, 40)), st.sampled_from(list(PROTOCOLS)))
def test_property_persistent_ids_for_some_containers(value: Any, chosen: set[int],
                                                     protocol: int) -> None:
    """persistent_id answers for a random few containers; the engine is told which by
    persistent_id_for_ids, the stdlib asks about every object: the bytes are the same."""
    containers = containers_in([value, value])
    refs = {id(obj): f"ref{index}" for index, obj in enumerate(containers) if index in chosen}

    def persistent_id(self: Any, obj: Any) -> Any:
        return refs.get(id(obj)) if type(obj) in (list, tuple, dict, frozenset, bytes,
                                                  bytearray) else None

    class Engine(engine.Pickler):
        persistent_id_for_atoms = False
        persistent_id_for_ids = refs

    class Std(pickle.Pickler):
        pass

    Engine.persistent_id = persistent_id        # type: ignore[method-assign]
    Std.persistent_id = persistent_id           # type: ignore[method-assign]
    expected = io.BytesIO()
    Std(expected, protocol).dump([value, value])
    assert dumps_both([value, value], protocol, Engine) == expected.getvalue()


# -- objects handed back to Python, and the hooks ------------------------------------------

class Point:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return type(other) is Point and other.x == self.x


class Tagged(dict):
    pass


@needs_speedups
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_handed_back_objects_inside_plain_data(protocol: int) -> None:
    """C resumes after each object Python saves: subclasses, instances, sets, globals."""
    point = Point(1)
    obj = {"points": [point, Point(2), point], "tagged": Tagged(a=[1, "x"]),
           "set": {1, 2}, "od": collections.OrderedDict(k=(point,)), "type": Point,
           "func": len, "complex": 1j, "after": ["still", "plain", (1.5, None)]}
    assert dumps_both(obj, protocol) == pickle.dumps(obj, protocol)


class Reffing(engine.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Point):
            return ("point", obj.x)
        if type(obj) is list and obj and obj[0] == "ref":
            return "a list"
        return None


class StdReffing(pickle.Pickler):
    persistent_id = Reffing.persistent_id


@needs_speedups
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_ids_from_c(protocol: int) -> None:
    obj = [Point(1), ["ref", 1], {"k": Point(2)}, ("t", ["ref"]), "text", 7]
    expected = io.BytesIO()
    StdReffing(expected, protocol).dump(obj)
    assert dumps_both(obj, protocol, Reffing) == expected.getvalue()


class CountingPickler(engine.Pickler):
    """Asks for persistent ids only for the containers listed in persistent_id_for_ids."""

    persistent_id_for_atoms = False

    def __init__(self, file: Any, protocol: int, listed: dict[int, Any]) -> None:
        super().__init__(file, protocol)
        self.persistent_id_for_ids = listed
        self.asked: list[Any] = []

    def persistent_id(self, obj: Any) -> Any:
        self.asked.append(obj)
        return "listed" if id(obj) in self.persistent_id_for_ids else None


@pytest.mark.parametrize("enabled", [True, False], ids=["c", "python"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_id_for_ids(enabled: bool, protocol: int) -> None:
    listed_list, listed_dict = [1], {"a": 1}
    plain_list, plain_tuple = [2], (3, [4])
    point, tagged = Point(5), Tagged()
    obj = [listed_list, plain_list, plain_tuple, listed_dict, b"bytes", point, tagged, {6}]
    with accelerated(enabled):
        stream = io.BytesIO()
        dumper = CountingPickler(stream, protocol, {id(listed_list): None, id(listed_dict): None})
        dumper.dump(obj)
    # Of the plain containers only the listed ones are asked about; all else is asked.
    plain_types = (dict, list, tuple, set, frozenset, bytes, bytearray)
    assert [id(o) for o in dumper.asked if type(o) in plain_types] == [id(listed_list),
                                                                       id(listed_dict)]
    assert any(o is point for o in dumper.asked) and any(o is tagged for o in dumper.asked)
    loaded = pickle.Unpickler(io.BytesIO(stream.getvalue()))
    loaded.persistent_load = lambda pid: pid
    assert loaded.load() == ["listed", [2], (3, [4]), "listed", b"bytes", point, {}, {6}]


def test_persistent_id_for_ids_must_be_a_dict() -> None:
    if speedups is None:
        pytest.skip("_pickler_speedups is not built")
    with accelerated(True):
        dumper = CountingPickler(io.BytesIO(), 5, {})
        dumper.persistent_id_for_ids = [1, 2]    # type: ignore[assignment]
        with pytest.raises(TypeError, match="persistent_id_for_ids must be a dict"):
            dumper.dump([1])


@needs_speedups
def test_errors_of_hooks_are_the_same_in_c_and_python() -> None:
    class Failing(engine.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            if obj == [2]:
                raise LookupError("no id for [2]")
            return None

    class Unreducible:
        def __reduce__(self) -> Any:
            raise ValueError("cannot reduce")

    raised = []
    for enabled in (True, False):
        with accelerated(enabled):
            for dumper, obj in ((Failing, [[1], [2]]), (engine.Pickler, {"k": [Unreducible()]})):
                with pytest.raises(Exception) as caught:
                    dumper(io.BytesIO(), 5).dump(obj)
                raised.append((type(caught.value), str(caught.value)))
    assert raised[:2] == raised[2:]
    assert raised[0] == (LookupError, "no id for [2]")


@needs_speedups
def test_a_dict_changed_while_pickled_is_an_error() -> None:
    target: dict = {i: i for i in range(5)}

    class Growing:
        def __reduce__(self) -> Any:
            target[len(target) + 100] = 0
            return (int, ())

    for enabled in (True, False):
        target.clear()
        target.update({i: i for i in range(5)})
        target[2] = Growing()
        with accelerated(enabled), pytest.raises(RuntimeError, match="changed size"):
            engine.dumps(target)


# Hooks reached from C that change what C is pickling: they empty, grow and replace the
# containers being saved, clear the memo, drop the last reference to the object being
# saved, dump with the same pickler again. Run under PYTHONMALLOC=debug (freed memory is
# overwritten, so a use after free crashes) in a child process; any result or error will
# do, a crash will not.
HOSTILE = '''
import io, sys
from pstore import engine

state = {}

class EmptiesList:
    def __reduce__(self):
        state["list"].clear()
        return (int, ())

class GrowsList:
    def __reduce__(self):
        if len(state["list"]) < 5000:
            state["list"].extend([EmptiesNothing()] * 3)
        return (int, ())

class EmptiesNothing:
    def __reduce__(self):
        return (int, ())

class ClearsDict:
    def __reduce__(self):
        state["dict"].clear()
        state["dict"].update({str(i): [i] for i in range(50)})
        return (int, ())

class DropsAll:
    def __reduce__(self):
        # after this, C's own references are the only ones to the containers it is in
        state["pickler"].clear_memo()
        state["root"].clear()
        state.clear()
        return (int, ())

class ClearsMemo:
    def __reduce__(self):
        state["pickler"].clear_memo()
        return (int, ())

class Redumps:
    def __reduce__(self):
        if state.get("depth", 0) < 3:
            state["depth"] = state.get("depth", 0) + 1
            state["pickler"].dump([1, "x", [2]])
        return (int, ())

class Pickler(engine.Pickler):
    def persistent_id(self, obj):
        if type(obj) is list and obj and obj[0] == "mutate":
            obj.clear()
            state.get("dict", {}).clear()
        return None

    def reducer_override(self, obj):
        if type(obj) is set:
            state.get("list", []).clear()
        return NotImplemented

def run(make):
    for protocol in range(1, 6):
        for enabled in (True, False):
            engine.use_accelerators(enabled)
            state.clear()
            root = [make(), "after"]
            state["root"] = root
            state["pickler"] = pickler = Pickler(io.BytesIO(), protocol)
            pickler.persistent_id_for_ids = {}
            try:
                pickler.dump(root)
            except Exception:
                pass

def listed(*items, times=300):
    value = [x for _ in range(times) for x in items]
    state["list"] = value
    return [value, "between", value]

def keyed(*items):
    value = {str(i): item for i, item in enumerate(items * 200)}
    state["dict"] = value
    return (value, [value])

for make in (
    lambda: listed(EmptiesList(), "s", (1, "t")),
    lambda: listed(GrowsList(), [1], times=3),
    lambda: listed(DropsAll(), {"k": [1]}, b"b"),
    lambda: listed(ClearsMemo(), "shared", ("shared",)),
    lambda: listed(Redumps(), "r"),
    lambda: listed({1}, "s"),
    lambda: keyed(ClearsDict(), [1], "v"),
    lambda: keyed(DropsAll(), "v"),
    lambda: keyed(["mutate", 1, 2], "v"),
    lambda: listed(["mutate", EmptiesList()], "z"),
    # the hook inside a container C is saving, whose last owner it drops
    lambda: listed({"k": EmptiesList(), "after": [1, "x"]}, ("t", [DropsAll(), "y"])),
    lambda: listed([EmptiesList(), "more", {"x": 1}], times=50),
    lambda: keyed([ClearsDict(), "more", {"x": 1}], ("t", ClearsDict(), [1])),
    lambda: listed([[DropsAll(), "deep", {"z": [1]}]]),
):
    run(make)
print("survived")
'''


@needs_speedups
def test_hooks_that_change_what_is_pickled_cannot_crash_it(tmp_path) -> None:
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONMALLOC": "debug", "PYTHONPATH": REPO},
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "survived"


# -- leaks ---------------------------------------------------------------------------------------

@needs_speedups
def test_leaks_nothing() -> None:
    point = Point(3)
    value = {"id": 1, "name": "record", "tags": ["a", "b", ("t", 1)], "score": 0.5,
             "n": None, "flags": [True, False], "big": -2 ** 40, "huge": 2 ** 100,
             "raw": b"bytes", "mutable": bytearray(b"ba"), "point": point, "set": {1, 2},
             "nested": [[{}]] * 3, "long": "é" * 300, "tuple": (point, [point])}
    with accelerated(True):
        for protocol in range(1, 6):      # warm up: caches, interned strings
            engine.dumps(value, protocol)
            Reffing(io.BytesIO(), protocol).dump(value)
        gc.collect()    # a pickler's closures form a cycle: their memo goes with the cycle
        refs_before = sys.getrefcount(point), sys.getrefcount(value["tags"])
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(1000):
                for protocol in range(1, 6):
                    engine.dumps(value, protocol)
                    Reffing(io.BytesIO(), protocol).dump(value)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert (sys.getrefcount(point), sys.getrefcount(value["tags"])) == refs_before
    # One leaked object per dump would be 10,000 objects: well over a megabyte.
    assert grown < 64 * 1024


# -- the Memo: C's memo, a mapping for the Python pickler ------------------------------------

@needs_speedups
def test_memo_is_a_mapping_of_ids() -> None:
    memo = speedups.Memo()
    first, second = ["a"], ["b"]
    memo[id(first)] = (0, first)
    memo[id(second)] = (1, second)
    assert len(memo) == 2 and id(first) in memo and id([]) not in memo
    assert memo[id(second)] == (1, second) and memo.get(id(first)) == (0, first)
    assert memo.get(-1) is None and memo.get("not an id", "default") == "default"
    assert memo.copy() == {id(first): (0, first), id(second): (1, second)}
    with pytest.raises(KeyError):
        memo[id(memo)]
    with pytest.raises(ValueError, match="memo\\[id\\(obj\\)\\]"):
        memo[id(first)] = (2, second)
    with pytest.raises(TypeError, match="does not delete"):
        del memo[id(first)]
    memo.clear()
    assert len(memo) == 0 and memo.get(id(first)) is None


@needs_speedups
def test_the_memo_keeps_objects_across_dumps_until_cleared() -> None:
    with accelerated(True):
        stream = io.BytesIO()
        dumper = engine.Pickler(stream, 2)
        shared = ["shared"]
        dumper.dump(shared)
        dumper.dump([shared, shared])    # a memo reference to the first dump's list
        assert type(dumper.memo) is speedups.Memo and len(dumper.memo) == 3
        stream.seek(0)
        loader = pickle.Unpickler(stream)
        first, second = loader.load(), loader.load()
        assert second == [first, first] and second[0] is first
        dumper.clear_memo()
        assert len(dumper.memo) == 0


# -- the one switch, and no compiler ------------------------------------------------------------

NO_EXTENSIONS = '''
import hashlib, importlib.abc, sys

class NoExtensions(importlib.abc.MetaPathFinder):
    """As if pstore had been installed without a C compiler."""
    def find_spec(self, name, path, target=None):
        if name in ("pstore.engine._speedups", "pstore.engine._pickler_speedups"):
            raise ImportError(f"{name} is not built")
        return None

if sys.argv[1] == "blocked":
    sys.meta_path.insert(0, NoExtensions())
from pstore import engine
from pstore.engine import pickler, unpickler
sys.path.insert(0, sys.argv[2])
from tests.engine import samples

digest = hashlib.sha256()
for protocol in range(6):
    for obj in samples.all_samples():
        try:
            data = engine.dumps(obj, protocol)
        except Exception as error:
            data = type(error).__name__.encode()
        digest.update(data)
print(pickler._accelerator is None, unpickler._accelerate is None, digest.hexdigest())
'''


@needs_speedups
def test_without_the_extensions_pure_python_writes_the_same_bytes(tmp_path) -> None:
    script = tmp_path / "no_extensions.py"
    script.write_text(NO_EXTENSIONS)
    outputs = {}
    for how, extra_env in (("blocked", {}), ("normal", {}), ("env", {"PSTORE_PURE_PYTHON": "1"})):
        env = {key: value for key, value in os.environ.items() if key != "PSTORE_PURE_PYTHON"}
        result = subprocess.run([sys.executable, str(script), how, REPO], capture_output=True,
                                text=True, env={**env, "PYTHONPATH": REPO, **extra_env},
                                timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[how] = result.stdout.split()
    assert outputs["blocked"][:2] == ["True", "True"]     # pure Python, both directions
    assert outputs["env"][:2] == ["True", "True"]         # PSTORE_PURE_PYTHON=1 turns both off
    assert outputs["normal"][:2] == ["False", "False"]
    assert outputs["blocked"][2] == outputs["normal"][2] == outputs["env"][2]


def test_use_accelerators_switches_both() -> None:
    try:
        assert engine.use_accelerators(False) is False
        assert pickler._accelerator is None and engine.unpickler._accelerate is None
        on = engine.use_accelerators(True)
        assert on is (speedups is not None and engine._unpickler_speedups is not None)
        assert (pickler._accelerator is not None) is (speedups is not None)
    finally:
        engine.use_accelerators()
