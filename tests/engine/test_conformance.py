"""Behaviours where pstore.engine follows CPython's pickle beyond the bytes of ordinary data.

Each test is differential: the C ``pickle`` module of the running Python is the oracle
(and, for the bytes of nested names, the other CPython versions found on PATH).
"""

from __future__ import annotations

import gc
import io
import itertools
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path
from typing import Any

import pytest

from pstore import engine
from tests.engine import nested_names
from tests.engine.nested_names import NESTED, Outer, Recursive

PROTOCOLS = range(engine.HIGHEST_PROTOCOL + 1)
ROOT = Path(__file__).resolve().parents[2]


# -- Globals with dotted qualified names -------------------------------------------------------

@pytest.mark.parametrize("fix_imports", [True, False])
@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("obj", NESTED, ids=lambda obj: obj.__qualname__)
def test_nested_names_are_written_as_cpython_writes_them(obj, protocol, fix_imports):
    ours = engine.dumps(obj, protocol, fix_imports=fix_imports)
    assert ours == pickle.dumps(obj, protocol, fix_imports=fix_imports)
    assert pickle.loads(ours) is obj
    assert engine.loads(ours) is obj


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nested_names_share_the_memo_as_cpython_does(protocol):
    obj = [Outer.Inner, Outer, Outer.Inner.Deepest, (Outer.Inner, Recursive), Recursive]
    assert engine.dumps(obj, protocol) == pickle.dumps(obj, protocol)


def test_recursive_name_is_written_by_its_last_part():
    # The path "Recursive.mod.Recursive" ends on the module itself: one plain GLOBAL.
    assert engine.dumps(Recursive, 0) == f"c{nested_names.__name__}\nRecursive\np0\n.".encode()


def _other_pythons() -> list[str]:
    """The interpreters of the other CPython versions 3.10 to 3.13 that run here: on PATH
    (a pyenv shim may not run), or installed by pyenv."""
    candidates = [f"python3.{minor}" for minor in (10, 11, 12, 13)]
    if shutil.which("pyenv") is not None:
        def pyenv(*args: str) -> str:
            return subprocess.run(["pyenv", *args], capture_output=True, text=True,
                                  timeout=60, check=False).stdout
        root = pyenv("root").strip()
        candidates += [f"{root}/versions/{version}/bin/python"
                       for version in pyenv("versions", "--bare").split()]
    found: dict[str, str] = {}
    for candidate in candidates:
        path = shutil.which(candidate)
        if path is None:
            continue
        check = subprocess.run([path, "-c", "import sys; print(sys.version_info[1])"],
                               capture_output=True, text=True, timeout=60, check=False)
        minor = check.stdout.strip()
        if check.returncode == 0 and minor in ("10", "11", "12", "13") \
                and minor != str(sys.version_info[1]):
            found.setdefault(minor, path)
    return sorted(found.values())


@pytest.mark.parametrize("python", _other_pythons() or [pytest.param(None, marks=pytest.mark.skip(
    reason="no other CPython 3.10-3.13 on PATH"))])
def test_nested_names_match_each_python_version(python, tmp_path):
    # Each version writes nested names its own way below protocol 4 (3.13 as a getattr chain
    # from the top-level name): the engine run by that version writes what its pickle writes.
    script = tmp_path / "compare.py"
    script.write_text(textwrap.dedent("""
        import pickle, sys
        from pstore import engine
        from tests.engine import nested_names as here
        mismatches = []
        for obj in here.NESTED + [[here.Outer.Inner, here.Outer, here.Outer.Inner.Deepest]]:
            for protocol in range(6):
                for fix_imports in (True, False):
                    ours = engine.dumps(obj, protocol, fix_imports=fix_imports)
                    if ours != pickle.dumps(obj, protocol, fix_imports=fix_imports):
                        mismatches.append((repr(obj), protocol, fix_imports, ours))
                    elif pickle.loads(ours) != obj or engine.loads(ours) != obj:
                        mismatches.append((repr(obj), protocol, "load"))
        print(mismatches)
    """))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([python, str(script)], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _stack_global(module: str, name: str) -> bytes:
    return b"".join(b"\x8c" + bytes([len(text)]) + text
                    for text in (module.encode(), name.encode())) + b"\x93"


def test_the_getattr_route_of_every_version_loads():
    # What CPython 3.10-3.12 write for Outer.Inner.Deepest at protocol 2, and 3.13's chain.
    module = nested_names.__name__
    before_313 = (b"\x80\x02c__builtin__\ngetattr\nq\x00h\x00" + _global(module, "Outer")
                  + b"q\x01X\x05\x00\x00\x00Innerq\x02\x86q\x03Rq\x04"
                  + b"X\x07\x00\x00\x00Deepestq\x05\x86q\x06Rq\x07.")
    chain_313 = (b"\x80\x02c__builtin__\ngetattr\nq\x00h\x00" + _global(module, "Outer")
                 + b"X\x05\x00\x00\x00Innerq\x01\x86RX\x07\x00\x00\x00Deepestq\x02\x86Rq\x03.")
    for data in (before_313, chain_313):
        assert pickle.loads(data) is Outer.Inner.Deepest
        assert engine.loads(data) is Outer.Inner.Deepest


LOOKED_UP = ["Outer", "Outer.Inner", "Outer.Inner.Deepest", "Recursive.mod.Recursive",
             "Recursive", "Recursive.mod", "ThroughModule.mod.ThroughModule.Nested",
             "Outer.<locals>.x", "<locals>", "Outer.Nope", "Nope.Outer", "Outer..Inner",
             ".Outer", "Outer.", "", "Outer.Inner.method", "Outer.__qualname__.upper"]


def _outcome(load: Any, data: bytes) -> Any:
    try:
        return ("value", load(data))
    except Exception as error:  # noqa: BLE001 - the outcome is compared, type and message
        return (type(error), str(error))


@pytest.mark.usefixtures("engine_mode")
@pytest.mark.parametrize("protocol", [None, *PROTOCOLS])
@pytest.mark.parametrize(("name", "opcode"), [
    (name, opcode) for name in LOOKED_UP for opcode in ("GLOBAL", "STACK_GLOBAL")
    if name or opcode == "STACK_GLOBAL"])   # GLOBAL's empty line is an error of its own
def test_dotted_names_load_as_cpython_loads_them(name, opcode, protocol):
    body = (_global if opcode == "GLOBAL" else _stack_global)(nested_names.__name__, name)
    data = (b"" if protocol is None else b"\x80" + bytes([protocol])) + body + b"."
    expected = _outcome(pickle.loads, data)
    got = _outcome(engine.loads, data)
    if expected[0] == "value":
        assert got[0] == "value" and got[1] == expected[1]
    else:
        assert got == expected


# -- Subclasses that skip __init__ ------------------------------------------------------------

def _uninitialised_subclasses(base: type) -> type:
    class Skipping(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any) -> None:
            pass
    return Skipping


def test_pickler_subclass_without_init_raises_picklingerror():
    with pytest.raises(pickle.PicklingError) as expected:
        _uninitialised_subclasses(pickle.Pickler)(io.BytesIO()).dump(1)
    with pytest.raises(pickle.PicklingError) as got:
        _uninitialised_subclasses(engine.Pickler)(io.BytesIO()).dump(1)
    assert str(got.value) == str(expected.value) == \
        "Pickler.__init__() was not called by Skipping.__init__()"


def test_unpickler_subclass_without_init_raises_unpicklingerror():
    with pytest.raises(pickle.UnpicklingError) as expected:
        _uninitialised_subclasses(pickle.Unpickler)(io.BytesIO(b"N.")).load()
    skipping = _uninitialised_subclasses(engine.Unpickler)(io.BytesIO(b"N."))
    with pytest.raises(pickle.UnpicklingError) as got:
        skipping.load()
    assert str(got.value) == str(expected.value) == \
        "Unpickler.__init__() was not called by Skipping.__init__()"
    with pytest.raises(pickle.UnpicklingError, match=r"Unpickler\.__init__\(\) was not called"):
        skipping.load_bytes(b"N.")


# -- The file's attributes --------------------------------------------------------------------

class FileAttributeError(Exception):
    """Raised by a file's attribute: the unpickler must let it through as it is."""


def _raising_property(error: BaseException) -> property:
    def get(self: Any) -> Any:
        raise error
    return property(get)


def _read(self: Any, *args: Any) -> bytes:
    return b"N."


# Each attribute of the file: absent, a method, a property raising AttributeError (which means
# absent), a property raising another exception, or None (present, so accepted).
ATTRIBUTE_KINDS = ["absent", "method", "attribute-error", "raises", "none"]
FILE_ATTRIBUTES = ["peek", "readinto", "read", "readline"]


def _file_class(kinds: tuple[str, ...]) -> type:
    namespace: dict[str, Any] = {}
    for attribute, kind in zip(FILE_ATTRIBUTES, kinds, strict=True):
        if kind == "method":
            namespace[attribute] = _read
        elif kind == "attribute-error":
            namespace[attribute] = _raising_property(AttributeError(attribute))
        elif kind == "raises":
            namespace[attribute] = _raising_property(FileAttributeError(attribute))
        elif kind == "none":
            namespace[attribute] = None
    return type("File", (), namespace)


@pytest.mark.parametrize("kinds", itertools.product(ATTRIBUTE_KINDS, repeat=4),
                         ids=lambda kinds: "-".join(kinds))
def test_file_attributes_are_looked_up_as_cpython_does(kinds):
    file = _file_class(kinds)()
    expected = _outcome(pickle.Unpickler, file)
    got = _outcome(engine.Unpickler, file)
    if expected[0] == "value":
        assert got[0] == "value"
    else:
        assert got == expected


def test_the_files_own_exception_object_propagates():
    error = FileAttributeError("read is broken")
    file = type("File", (), {"read": _raising_property(error)})()   # and no readline
    with pytest.raises(FileAttributeError) as info:
        engine.Unpickler(file)
    assert info.value is error


# -- No reference to the pickled object after a dump ------------------------------------------

class Tracked:
    """An object a weak reference can watch."""

    def __init__(self) -> None:
        self.payload = [1, "two"]


class Refusing:
    def __reduce__(self) -> Any:
        raise ValueError("refused")


def _shapes(tracked: Tracked) -> list[Any]:
    """``tracked`` inside each kind of container, and in the state of another object."""
    holder = Tracked()
    holder.payload = [tracked]
    return [tracked, [tracked], (tracked, 1), {"k": tracked}, {1: [tracked, tracked]},
            [[[tracked]]], holder, [tracked, list(range(2000))]]


def _assert_released(make_and_dump: Any) -> None:
    reference = make_and_dump()
    gc.collect()
    assert reference() is None


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("shape", range(len(_shapes(Tracked()))))
def test_dumps_keeps_no_reference(protocol, shape):
    def dump_it() -> weakref.ref:
        tracked = Tracked()
        engine.dumps(_shapes(tracked)[shape], protocol)
        engine.dumps(_shapes(tracked)[shape], protocol)  # the cached pickler, used again
        return weakref.ref(tracked)
    _assert_released(dump_it)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_dump_keeps_no_reference(protocol):
    def dump_it() -> weakref.ref:
        tracked = Tracked()
        engine.dump([tracked], io.BytesIO(), protocol)
        return weakref.ref(tracked)
    _assert_released(dump_it)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_failed_dumps_keeps_no_reference(protocol):
    def dump_it() -> weakref.ref:
        tracked = Tracked()
        with pytest.raises(ValueError, match="refused"):
            engine.dumps([tracked, Refusing()], protocol)
        return weakref.ref(tracked)
    _assert_released(dump_it)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pickler_keeps_objects_only_in_its_memo(protocol):
    # As in CPython, the memo holds what was dumped until clear_memo(); nothing else does.
    pickler = engine.Pickler(io.BytesIO(), protocol)

    def dump_it() -> weakref.ref:
        tracked = Tracked()
        pickler.dump([tracked])
        return weakref.ref(tracked)
    reference = dump_it()
    gc.collect()
    assert reference() is not None
    pickler.clear_memo()
    gc.collect()
    assert reference() is None
