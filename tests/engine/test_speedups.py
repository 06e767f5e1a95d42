"""The unpickler's C fast path, pstore.engine._speedups.

test_unpickler.py and test_corpus.py run every load with and without it (conftest.py),
against the stdlib: results and errors must not depend on it. Here: that it (and the
pickler's, tested in test_pickler_speedups.py) is built wherever a C compiler is, where
exactly it stops and leaves an opcode to Python, and that it leaks nothing.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
import tracemalloc

import pytest

from pstore import engine
from pstore.engine import unpickler

speedups = engine._unpickler_speedups
needs_speedups = pytest.mark.skipif(speedups is None, reason="_speedups is not built")


def test_both_built_wherever_a_c_compiler_is() -> None:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}): pstore runs in pure Python")
    assert speedups is not None, "pip install should have built pstore/engine/_speedups.c"
    assert engine._pickler_speedups is not None, \
        "pip install should have built pstore/engine/_pickler_speedups.c"


def run(data: bytes, stack: list | None = None, metastack: list | None = None,
        memo: dict | None = None) -> tuple[int, list]:
    return speedups.run(data, 0, [] if stack is None else stack,
                        [] if metastack is None else metastack, {} if memo is None else memo)


@needs_speedups
def test_runs_data_opcodes_and_stops_before_stop() -> None:
    #         BININT1 5  NONE  EMPTY_LIST MEMOIZE MARK BININT1 1 BININT1 2 APPENDS STOP
    data = b"K\x05" b"N" b"]" b"\x94" b"(" b"K\x01" b"K\x02" b"e" b"."
    memo: dict = {}
    assert run(data, memo=memo) == (len(data) - 1, [5, None, [1, 2]])
    assert memo == {0: [1, 2]}


@needs_speedups
@pytest.mark.parametrize("before, left, why", [
    (b"", b"cbuiltins\nlen\n", "GLOBAL: globals are Python's (find_class)"),
    (b"K\x01", b"Q", "BINPERSID: persistent ids are Python's"),
    (b"", b"X\x05\x00\x00\x00ab", "BINUNICODE: truncated argument"),
    (b"", b"\x8c\x02\xff\xfe", "SHORT_BINUNICODE: not UTF-8"),
    (b"", b"\x8a\x09" + bytes(9), "LONG1: longer than 8 bytes"),
    (b"", b"h\x03", "BINGET: not in the memo"),
    (b"K\x01", b"\x86", "TUPLE2: one item"),
    (b"K\x01", b"t", "TUPLE: no mark"),
    (b"(", b"0", "POP: of the mark itself"),
    (b"}K\x01\x85\x85K\x03", b"s", "SETITEM: a key of a nested tuple (not a short tuple of atoms)"),
    (b"}(K\x01", b"u", "SETITEMS: odd number of items"),
    (b"N(K\x01", b"e", "APPENDS: target is not a list"),
    (b"", b"\x95\x10" + bytes(7) + b"N", "FRAME: its bytes are not all there"),
    (b"N", b".", "STOP: the loop's"),
])
def test_stops_before_an_opcode_it_leaves_to_python(before: bytes, left: bytes, why: str) -> None:
    metastack: list = []
    pos, level = run(before + left, metastack=metastack)
    # The opcode at pos has not run: the state is that of the opcodes before it.
    expected_metastack: list = []
    assert run(before, metastack=expected_metastack) == (pos, level), why
    assert pos == len(before), why
    assert metastack == expected_metastack, why


@needs_speedups
def test_leaves_the_rest_to_python_with_the_same_result() -> None:
    """Values that make C stop mid-pickle (a tuple key, a long int, a subclass, a
    persistent id, a global) load as the stdlib loads them, in both modes."""
    class Loader(engine.Unpickler):
        def persistent_load(self, pid):
            return ("ref", pid)

    class StdLoader(pickle.Unpickler):
        def persistent_load(self, pid):
            return ("ref", pid)

    class Saver(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, Ref) else None

    value = {"a": [1, 2, {(1, 2): 3}], "big": 2 ** 80, "od": collections.OrderedDict(x=1),
             "ref": Ref(7), "after": ["still", "data", 1.5, frozenset({1})], "s": {1, "x"}}
    for protocol in range(6):
        buffer = io.BytesIO()
        Saver(buffer, protocol).dump(value)
        data = buffer.getvalue()
        expected = StdLoader(io.BytesIO(data)).load()
        assert Loader(io.BytesIO(data)).load() == expected


class Ref:
    def __init__(self, pid: int) -> None:
        self.pid = pid


# -- load_pickle: a whole pickle in one call, or the state to go on from ------------------

@needs_speedups
@pytest.mark.parametrize("protocol", range(2, 6))     # 0 and 1 write text opcodes: Python's
def test_load_pickle_reads_a_plain_pickle_whole(protocol: int) -> None:
    value = {"id": 7, "name": "n7", "tags": ["a", "b", ("t", 1)], "score": 0.5, "none": None,
             "big": -2 ** 40, "shared": [[1]] * 2}
    first, second = pickle.dumps(value, protocol), pickle.dumps([1.5, "x"], protocol)
    data = b"junk" + first + second
    loaded, end = speedups.load_pickle(data, 4, sys.maxsize)
    assert loaded == value and end == 4 + len(first)
    assert loaded["shared"][0] is loaded["shared"][1]       # the memo of its own
    assert speedups.load_pickle(data, end, sys.maxsize) == ([1.5, "x"], len(data))


@needs_speedups
@pytest.mark.parametrize("data, pos, proto, why", [
    (b"\x80\x05\x95\x08\x00\x00\x00\x00\x00\x00\x00K\x01\x8c\x01a\x94\x93.", 17, 5,
     "STACK_GLOBAL after PROTO, FRAME, two values"),
    (b"\x80\x06N.", 0, 0, "a protocol it does not know: Python refuses it"),
    (b"\x80", 0, 0, "PROTO without its argument"),
    (b"K\x01(K\x02", 5, 0, "no STOP: the pickle is truncated"),
    (b"(.", 1, 0, "STOP on an empty level (only a mark below)"),
    (b"", 0, 0, "no opcode at all"),
])
def test_load_pickle_returns_the_state_where_it_stopped(data: bytes, pos: int, proto: int,
                                                        why: str) -> None:
    state = speedups.load_pickle(data, 0, sys.maxsize)
    assert len(state) == 5, why
    assert state[0] == pos and state[4] == proto, why
    # The state is that of run() from the same place, after the PROTO it took.
    start = 2 if proto else 0
    metastack: list = []
    memo: dict = {}
    assert speedups.run(data, start, [], metastack, memo) == (pos, state[1]), why
    assert (state[2], state[3]) == (metastack, memo), why


@pytest.mark.parametrize("protocol", [2, 5])
def test_buffers_that_are_not_iterable_are_refused_in_both_modes(protocol: int) -> None:
    # A pickle C reads whole still has its buffers checked first, as pure Python does.
    data = pickle.dumps([1, 2], protocol)
    with pytest.raises(TypeError):
        pickle.loads(data, buffers=5)
    with pytest.raises(TypeError):
        engine.loads(data, buffers=5)
    unpickler = engine.Unpickler(io.BytesIO(b""))
    with pytest.raises(TypeError):
        unpickler.load_bytes(data, 5)
    assert unpickler.memo == {} and unpickler.proto == 0     # put back as they were


@needs_speedups
def test_load_pickle_of_a_non_bytes_leaves_all_to_python() -> None:
    assert speedups.load_pickle(bytearray(b"N."), 0, sys.maxsize) == (0, [], [], {}, 0)
    assert speedups.load_pickle(b"N.", -1, sys.maxsize)[0] == -1


@needs_speedups
def test_load_pickle_respects_the_mark_limit() -> None:
    state = speedups.load_pickle(b"\x80\x02(((K\x01ttt.", 0, 2)
    assert state[0] == 4 and len(state[2]) == 2     # the third MARK is Python's
    class Shallow(engine.RestrictedUnpickler):
        mark_limit = 2

    with pytest.raises(engine.UnpicklingError, match="more than 2 nested marks"):
        Shallow(io.BytesIO(b"")).load_bytes(b"\x80\x02(((K\x01ttt.")


@needs_speedups
def test_a_pickle_c_stops_in_goes_on_in_python(monkeypatch) -> None:
    """load_bytes goes on from where load_pickle stopped, with the memo C made (a
    reference after that point finds its object) and the protocol: the result is the
    pure-Python loop's, and the global is resolved once."""
    value = [{"k": i, "s": "text"} for i in range(50)] + [collections.OrderedDict(a=1)]
    value.append(value[0])      # a memo reference after the point where C stopped
    seen: list[str] = []

    class Counting(engine.Unpickler):
        def find_class(self, module, name):
            seen.append(name)
            return super().find_class(module, name)

    data = pickle.dumps(value, 4)
    loaded = Counting(io.BytesIO(b"")).load_bytes(data)
    assert seen == ["OrderedDict"]
    assert loaded == value and loaded[-1] is loaded[0]
    monkeypatch.setattr(unpickler, "_load_pickle", None)
    monkeypatch.setattr(unpickler, "_accelerate", None)
    assert Counting(io.BytesIO(b"")).load_bytes(data) == loaded


@needs_speedups
def test_memo_with_gaps_then_memoize() -> None:
    #       EMPTY_LIST BINPUT 5   MEMOIZE (key len(memo) == 1)  BINGET 1  BINGET 5  TUPLE2 STOP
    data = b"\x80\x04]q\x05\x94h\x01h\x05\x86."
    assert engine.loads(data) == pickle.loads(data)
    first, second = engine.loads(data)
    assert first is second


def _long_binput(index: int) -> bytes:
    return b"r" + index.to_bytes(4, "little")


def _long_binget(index: int) -> bytes:
    return b"j" + index.to_bytes(4, "little")


@needs_speedups
@pytest.mark.parametrize("index", [0, 63, 64, 1000, 1025, 5000, 2**32 - 1])
def test_memo_indexes_near_and_far_load_as_in_pure_python(index: int) -> None:
    # load_pickle keeps its memo in an array while the indexes stay near the entries made,
    # and turns it into a dict for a far one: either way, what pure Python loads (and the
    # stdlib, but for the last index, for which it would need a memo of 2**32 slots).
    #       EMPTY_LIST PUT index  EMPTY_LIST PUT index (replaces)  GET index  TUPLE3 STOP
    data = b"\x80\x04]" + _long_binput(index) + b"]" + _long_binput(index) \
        + _long_binget(index) + b"\x87."
    loaded = engine.loads(data)
    assert loaded == ([], [], []) and loaded[1] is loaded[2] and loaded[0] is not loaded[1]
    engine.use_accelerators(False)
    try:
        assert engine.loads(data) == loaded
    finally:
        engine.use_accelerators()
    if index < 2**31:
        stdlib = pickle.loads(data)
        assert stdlib == loaded and stdlib[1] is stdlib[2]


@needs_speedups
def test_a_memo_of_far_indexes_stays_small() -> None:
    # A few bytes naming indexes far apart cost memory in proportion to the entries.
    data = b"\x80\x04" + b"".join(b"N" + _long_binput(i * 10**6) + b"0" for i in range(200))
    data += b"N."
    tracemalloc.start()
    try:
        assert engine.loads(data) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@needs_speedups
def test_leaks_nothing() -> None:
    # No globals (bytes and sets need some below protocols 3 and 4): an audit hook that
    # another test added for find_class would keep every event, and look like a leak.
    value = {"id": 1, "name": "record", "tags": ["a", "b", ("t", 1)], "score": 0.5,
             "n": None, "flags": [True, False], "big": -2 ** 40, "nested": [[{}]] * 3,
             (1, (2,)): "nested tuple key: left to Python"}
    sets = {"b": b"bytes", "set": {1, 2}, "frozen": frozenset({"x"}), "value": value}
    blobs = [pickle.dumps(value, protocol) for protocol in (1, 2, 3)]
    blobs += [pickle.dumps(sets, protocol) for protocol in (4, 5)]
    for data in blobs:      # warm up: caches, interned strings
        engine.loads(data)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(4000):
            for data in blobs:
                engine.loads(data)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # One leaked object per load would be 20,000 objects: well over a megabyte.
    assert grown < 64 * 1024


# -- User code reached from C: a key's __eq__ when a new key collides with it -------------

class RaisingKey:
    def __hash__(self) -> int:
        return 1    # collides with the int key 1

    def __eq__(self, other: object) -> bool:
        raise ValueError("raised by RaisingKey.__eq__")


def dict_with_raising_key() -> dict:
    return {RaisingKey(): 0}


def set_with_raising_key() -> set:
    return {RaisingKey()}


_HERE = f"{__name__}\n".encode()


@needs_speedups
@pytest.mark.parametrize("data", [
    # a dict made by Python (REDUCE), then SETITEM 1: None, run by C
    b"\x80\x02c" + _HERE + b"dict_with_raising_key\n)RK\x01Ns.",
    # the same through SETITEMS, and a set through ADDITEMS
    b"\x80\x02c" + _HERE + b"dict_with_raising_key\n)R(K\x02NK\x01Nu.",
    b"\x80\x04c" + _HERE + b"set_with_raising_key\n)R(K\x02K\x01\x90.",
], ids=["SETITEM", "SETITEMS", "ADDITEMS"])
def test_an_error_of_user_code_is_raised_as_in_python(data: bytes, monkeypatch) -> None:
    """C clears it and stops before the opcode: the Python loop raises it, with its location."""
    raised = []
    for accelerate, load_pickle in ((speedups.run, speedups.load_pickle), (None, None)):
        monkeypatch.setattr(unpickler, "_accelerate", accelerate)
        monkeypatch.setattr(unpickler, "_load_pickle", load_pickle)
        with pytest.raises(ValueError, match="RaisingKey") as caught:
            engine.loads(data)
        raised.append((str(caught.value), getattr(caught.value, "__notes__", None)))
    assert raised[0] == raised[1]


# A key whose __eq__ reaches into Unpickler._run and empties the current stack level:
# the only other owner of the dict or set C is filling. C must hold its own references.
HOSTILE = '''
import sys
from pstore import engine
import __main__

class Hostile:
    def __hash__(self):
        return 1
    def __eq__(self, other):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "_run":
            frame = frame.f_back
        if frame is not None:
            frame.f_locals["stack"].clear()
        return False

__main__.make_dict = lambda: {Hostile(): 0}
__main__.make_set = lambda: {Hostile()}
pairs = b"".join(b"K" + bytes([i]) + b"N" for i in range(1, 200))
for data in (b"\\x80\\x02c__main__\\nmake_dict\\n)R(" + pairs + b"u.",
             b"\\x80\\x02c__main__\\nmake_dict\\n)RK\\x01Ns" + b"K\\x02Ns" * 50 + b".",
             b"\\x80\\x04c__main__\\nmake_set\\n)R(" + pairs.replace(b"N", b"") + b"\\x90."):
    try:
        engine.loads(data)
    except Exception:
        pass    # any result or error will do; a crash will not
print("survived")
'''


# A finalizer run by the collector while C allocates a tuple (TUPLE2, TUPLE3), emptying
# the stack level C is about to take the tuple's items from.
FINALIZER = '''
import gc, sys
from pstore import engine
import __main__

class Clearer:
    def __del__(self):
        frame = sys._getframe()
        while frame is not None and frame.f_code.co_name != "_run":
            frame = frame.f_back
        if frame is not None:
            frame.f_locals["stack"].clear()

def make_garbage():
    gc.disable()
    for _ in range(50):
        item = Clearer()
        item.self = item    # a cycle: freed only by the collector
    # Tuples made now take every free one, so C's next tuple is a new allocation.
    __main__.kept = [(i, -i) for i in range(5000)] + [(i, i, i) for i in range(5000)]
    gc.set_threshold(1)     # collected at the next allocation: inside C
    gc.enable()
    return 0

__main__.make_garbage = make_garbage
for data in (b"\\x80\\x02c__main__\\nmake_garbage\\n)RK\\x01K\\x02\\x86.",
             b"\\x80\\x02c__main__\\nmake_garbage\\n)RK\\x01K\\x02K\\x03\\x87\\x86."):
    for _ in range(20):
        try:
            engine.loads(data)
        except Exception:
            pass    # any result or error will do; a crash will not
print("survived")
'''


@needs_speedups
@pytest.mark.parametrize("script", [HOSTILE, FINALIZER], ids=["__eq__", "finalizer"])
def test_user_code_that_drops_references_cannot_crash_it(tmp_path, script: str) -> None:
    path = tmp_path / "hostile.py"
    path.write_text(script)
    # PYTHONMALLOC=debug: freed memory is overwritten, so a use after free crashes.
    result = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONMALLOC": "debug"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "survived"
