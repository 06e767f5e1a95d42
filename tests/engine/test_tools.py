"""pstore.engine.tools: disassembling a pickle and listing its globals, nothing run.

The stdlib is the oracle: ``pickletools.genops`` for the instructions, and a
``pickle._Unpickler`` that records its ``find_class`` calls for the globals.
"""

from __future__ import annotations

import builtins
import collections
import copyreg
import datetime
import decimal
import enum
import fractions
import functools
import io
import json
import os
import pickle
import pickletools
import struct
import sys
import tracemalloc
import uuid
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pstore.engine import opcodes, tools
from pstore.engine.tools import disassemble, globals_of, iter_instructions

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus"


# -- objects to pickle -----------------------------------------------------------------------

class Plain:
    def __init__(self) -> None:
        self.a = [1, "two"]


class Slotted:
    __slots__ = ("x",)

    def __init__(self) -> None:
        self.x = 1


class Outer:
    class Inner:
        pass


class NewArgsEx:
    kwargs: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> NewArgsEx:
        self = super().__new__(cls)
        self.kwargs = kwargs
        return self

    def __getnewargs_ex__(self) -> tuple[tuple, dict]:
        return (1,), {"key": "value"}


def _set_state(obj: Any, state: Any) -> None:
    obj.__dict__.update(state)


class WithStateSetter:
    def __reduce__(self) -> tuple:
        return (WithStateSetter, (), {"s": 1}, None, None, _set_state)


class Color(enum.Enum):
    RED = 1


def _objects() -> list[Any]:
    shared = [1, 2]
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    strings = [f"s{i}" for i in range(300)]
    return [
        None, True, False, 0, 1, -1, 255, 256, 65535, 65536, 2**31 - 1, -2**31, 2**31,
        2**64, -2**64, 7**900, 0.0, -0.0, 1.5, float("inf"), float("nan"),
        "", "ascii", "caf\xe9", "\U0001f600", "back\\slash\nnew\rline\x00\x1a", "\ud800",
        "x" * 300, b"", b"abc", b"\x00\xff" * 200, b"big" * 30000, bytearray(b"ab"), bytearray(),
        (), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), [], [1], list(range(2500)), {}, {"a": 1},
        dict.fromkeys(range(1500)), set(), {1, 2}, set(range(1200)), frozenset(), frozenset({1}),
        [shared, shared, (shared,)], cyclic, strings + strings, complex(1, 2),
        datetime.datetime(2024, 2, 29, 1, 2, 3, 4, datetime.timezone.utc),
        datetime.date(2000, 1, 1), datetime.timedelta(days=-1), decimal.Decimal("1.5"),
        fractions.Fraction(1, 3), uuid.UUID(int=12345), collections.OrderedDict(a=1),
        collections.defaultdict(list, a=[1]), collections.Counter("abca"),
        collections.deque([1], maxlen=3), len, os.path.join, collections.OrderedDict,
        Outer.Inner, Outer.Inner(), Plain(), Slotted(), NewArgsEx(), WithStateSetter(),
        Color.RED, functools.partial(int, base=2), range(10), slice(1, 2, 3), type(None),
        NotImplemented, Ellipsis, pickle.PickleBuffer(b"buffer"),
    ]


def _pickles() -> Iterator[tuple[str, bytes]]:
    """(id, pickle) for every object of _objects() at every protocol that can pickle it."""
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for index, obj in enumerate(_objects()):
            try:
                data = pickle.dumps(obj, protocol)
            except (pickle.PicklingError, TypeError, AttributeError):
                continue
            yield f"p{protocol}-{index}-{type(obj).__name__}", data


PICKLES = list(_pickles())


def _corpus_files() -> list[Path]:
    """The corpus files but the large ones, which only repeat opcodes the others have."""
    files = []
    for manifest in sorted(CORPUS.glob("*/MANIFEST.json")):
        entries = json.loads(manifest.read_text("ascii"))["entries"]
        files += [manifest.parent / entry["file"] for entry in entries]
    return [path for path in files if path.stat().st_size < 1500]


# -- instructions agree with pickletools.genops ----------------------------------------------

def _as_pickletools_shows(instruction: tools.Instruction) -> Any:
    """The argument in pickletools' form: 'module name', and 8-bit strings as latin-1 text."""
    argument = instruction.argument
    if instruction.opcode.arg.name == "stringnl_noescape_pair":
        return " ".join(argument)
    if instruction.opcode.arg.name in ("stringnl", "string1", "string4"):
        return argument.decode("latin-1")
    return argument


def _same(mine: Any, theirs: Any) -> bool:
    return type(mine) is type(theirs) and (mine == theirs or repr(mine) == repr(theirs))


def assert_agrees_with_genops(data: bytes, instructions: list[tools.Instruction]) -> None:
    expected = [(info.name, pos, arg) for info, arg, pos in pickletools.genops(data)]
    got = [(i.opcode.name, i.offset, _as_pickletools_shows(i)) for i in instructions]
    assert [row[:2] for row in got] == [row[:2] for row in expected]
    for (name, offset, mine), (_, _, theirs) in zip(got, expected, strict=True):
        assert _same(mine, theirs), f"{name} at {offset}: {mine!r} != {theirs!r}"


@pytest.mark.parametrize("data", [data for _, data in PICKLES],
                         ids=[name for name, _ in PICKLES])
def test_instructions_agree_with_genops(data: bytes) -> None:
    assert_agrees_with_genops(data, list(iter_instructions(data)))
    assert_agrees_with_genops(data, list(iter_instructions(bytearray(data))))


def test_instructions_agree_with_genops_on_the_corpus() -> None:
    """Pickles of Python 2.7 to 3.13, with the opcodes today's pickle no longer writes."""
    files = _corpus_files()
    assert len(files) > 3000
    seen: set[str] = set()
    for path in files:
        data = path.read_bytes()
        instructions = list(iter_instructions(data))
        seen.update(instruction.opcode.name for instruction in instructions)
        try:
            assert_agrees_with_genops(data, instructions)
        except UnicodeDecodeError:
            # genops decodes a STRING's bytes as ASCII; we give them as bytes.
            assert any(i.opcode.name == "STRING" and not i.argument.isascii()
                       for i in instructions)
    assert {"STRING", "BINSTRING", "SHORT_BINSTRING", "INST", "OBJ", "LONG", "FLOAT"} <= seen


# -- the disassembly listing ------------------------------------------------------------------

def test_disassemble_lists_every_opcode_with_memo_indexes() -> None:
    shared = ["x"]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps([shared, shared], protocol)
        lines = disassemble(data).splitlines()
        instructions = list(iter_instructions(data))
        assert len(lines) == len(instructions)
        for line, instruction in zip(lines, instructions, strict=True):
            offset, rest = line.split(":", 1)
            assert int(offset) == instruction.offset
            assert rest.split()[0] == instruction.opcode.name
        stored = [line for line in lines if "-> memo[" in line]
        assert stored and "-> memo[0]" in stored[0]
        read = [line for line in lines if "<- memo[" in line]
        assert len(read) == 1 and "<- memo[1]" in read[0]  # memo[0] is the outer list


def test_disassemble_shortens_large_payloads() -> None:
    data = pickle.dumps(b"\xab" * 10_000_000, 5)
    listing = disassemble(memoryview(data))
    assert len(listing) < 500
    assert "10000000 long" in listing


# -- globals_of agrees with what an unpickler imports -----------------------------------------

class _RecordingUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The stdlib's pure-Python unpickler, noting the global each find_class imports."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.found: dict[tuple[str, str], None] = {}

    def find_class(self, module: str, name: str) -> Any:
        # find_class maps Python 2 names itself (fix_imports): note what it imports.
        imported = (module, name)
        if self.proto < 3:  # type: ignore[attr-defined]
            if imported in NAME_MAPPING:
                imported = NAME_MAPPING[imported]
            else:
                imported = (IMPORT_MAPPING.get(module, module), name)
        self.found.setdefault(imported)
        return super().find_class(module, name)


def imported_by_unpickling(data: bytes) -> list[tuple[str, str]]:
    # An extension code resolved once is cached, and later loads skip find_class for it.
    copyreg._extension_cache.clear()  # type: ignore[attr-defined]
    unpickler = _RecordingUnpickler(data)
    unpickler.load()
    return list(unpickler.found)


@pytest.mark.parametrize("data", [data for _, data in PICKLES],
                         ids=[name for name, _ in PICKLES])
def test_globals_of_matches_an_unpickler(data: bytes) -> None:
    assert globals_of(data) == imported_by_unpickling(data)


def test_globals_of_matches_an_unpickler_on_the_corpus() -> None:
    sys.path.insert(0, str(CORPUS.parent))  # the corpus pickles need corpus_classes
    try:
        for path in _corpus_files():
            data = path.read_bytes()
            assert globals_of(data) == imported_by_unpickling(data), path
    finally:
        sys.path.remove(str(CORPUS.parent))


@pytest.fixture
def extensions() -> Iterator[dict[tuple[str, str], int]]:
    """Three extension codes, one per EXT opcode, registered for the test only."""
    codes = {("collections", "OrderedDict"): 0xF0, ("fractions", "Fraction"): 0x1234,
             ("decimal", "Decimal"): 0x123456}
    for (module, name), code in codes.items():
        copyreg.add_extension(module, name, code)
    try:
        yield codes
    finally:
        for (module, name), code in codes.items():
            copyreg.remove_extension(module, name, code)


def test_globals_of_resolves_extension_codes(extensions: dict[tuple[str, str], int]) -> None:
    value = [collections.OrderedDict(), fractions.Fraction(1, 2), decimal.Decimal(1)]
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(value, protocol)
        names = {i.opcode.name for i in iter_instructions(data)}
        assert {"EXT1", "EXT2", "EXT4"} <= names
        assert globals_of(data) == imported_by_unpickling(data)
        assert set(extensions) <= set(globals_of(data))


def test_globals_of_names_an_unregistered_extension_code() -> None:
    with pytest.raises(pickle.UnpicklingError, match=r"offset 2\b.*\b240\b"):
        globals_of(b"\x80\x02\x82\xf0.")


def test_globals_of_maps_python2_names() -> None:
    assert globals_of(b"c__builtin__\nset\n.") == [("builtins", "set")]
    assert globals_of(b"cUserDict\nUserDict\n.") == [("collections", "UserDict")]
    assert globals_of(b"\x80\x03c__builtin__\nset\n.") == [("__builtin__", "set")]


def test_globals_of_follows_strings_through_the_memo_and_dedups() -> None:
    data = (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93"  # os.system, memo 0 and 1
            b"h\x00h\x01\x93"                                  # again, from the memo
            b"U\x02os\x8c\x04path\x93"                         # an 8-bit module name
            b"\x86\x86.")
    assert globals_of(data) == [("os", "system"), ("os", "path")]


@pytest.mark.parametrize("data", [
    b"\x80\x04)\x8c\x01x\x93.",            # a tuple as the module
    b"\x80\x04\x8c\x01xK\x01\x93.",        # an int as the name
    b"\x80\x04\x8c\x01x\x8c\x01y\x86\x8c\x01z\x93.",  # a built tuple
    b"\x80\x04U\x02\xffx\x8c\x01y\x93.",   # a non-ASCII 8-bit string
])
def test_globals_of_refuses_non_constant_stack_global(data: bytes) -> None:
    offset = data.index(b"\x93")
    with pytest.raises(pickle.UnpicklingError, match=rf"STACK_GLOBAL at offset {offset}\b"):
        globals_of(data)


def test_hostile_pickle_is_inspected_without_running(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"called with {args!r}")

    real_import = builtins.__import__

    def guarded_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("no_such_module"):
            refuse(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(os, "system", refuse)
    for name in ("Unpickler", "_Unpickler", "loads", "load", "_loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(builtins, "__import__", guarded_import)
    hostile = [
        b"cos\nsystem\n(S'echo pwned'\ntR.",
        b"(S'echo pwned'\nios\nsystem\n.",
        b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c\x0aecho pwned\x85R.",
        b"cno_such_module_for_pstore\nanything\n)R.",
    ]
    expected = [[("os", "system")], [("os", "system")], [("os", "system")],
                [("no_such_module_for_pstore", "anything")]]
    for data, names in zip(hostile, expected, strict=True):
        assert globals_of(data) == names
        assert "system" in disassemble(data) or "anything" in disassemble(data)
    assert "no_such_module_for_pstore" not in sys.modules


# -- malformed and hostile input --------------------------------------------------------------

_SAMPLE = ["caf\xe9", 7**50, 1.5, (1, 2), {"k": [b"x", bytearray(b"y")]}, {3}, frozenset({4}),
           collections.OrderedDict(a=1), Plain(), Outer.Inner, True, None, -2**40]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_truncation_names_an_offset(protocol: int) -> None:
    data = pickle.dumps(_SAMPLE, protocol)
    for size in range(len(data)):
        for tool in (disassemble, globals_of, lambda d: list(iter_instructions(d))):
            with pytest.raises(pickle.UnpicklingError, match=r"offset \d+"):
                tool(data[:size])


@pytest.mark.parametrize(("data", "message"), [
    (b"\xff.", r"unknown opcode 0xff at offset 0"),
    (b"N\x8e" + struct.pack("<Q", 2**63) + b"xx.", r"BINBYTES8 at offset 1: .*9223372036854775808"),
    (b"\x8d" + struct.pack("<Q", 2**64 - 1) + b".", r"BINUNICODE8 at offset 0"),
    (b"\x96" + struct.pack("<Q", 2**40) + b".", r"BYTEARRAY8 at offset 0"),
    (b"X\xff\xff\xff\xff.", r"BINUNICODE at offset 0"),
    (b"T\xff\xff\xff\xff.", r"BINSTRING at offset 0: .*negative"),
    (b"\x8b\x00\x00\x00\x80.", r"LONG4 at offset 0: .*negative"),
    (b"\x80\x04\x95" + struct.pack("<Q", 2**60) + b"N.", r"FRAME at offset 2"),
    (b"C\x05abc", r"SHORT_BINBYTES at offset 0"),
    (b"Iabc\n.", r"INT at offset 0"),
    (b"S'unterminated\n.", r"STRING at offset 0"),
    (b"X\x02\x00\x00\x00\xed\xa0.", r"BINUNICODE at offset 0"),
    (b"N", r"offset 1 without a STOP"),
    (b"", r"offset 0 without a STOP"),
])
def test_malformed_input_fails_fast_naming_the_offset(data: bytes, message: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(pickle.UnpicklingError, match=message):
            list(iter_instructions(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000
    with pytest.raises(pickle.UnpicklingError, match=message):
        globals_of(data)


@pytest.mark.parametrize(("data", "message"), [
    (b"a.", r"APPEND at offset 0"),
    (b"N(a.", r"APPEND at offset 2"),
    (b"Nl.", r"LIST at offset 1: .*MARK"),
    (b"h\x05.", r"BINGET at offset 0: .*memo\[5\]"),
    (b"\x93.", r"STACK_GLOBAL at offset 0"),
])
def test_globals_of_refuses_an_impossible_stack(data: bytes, message: str) -> None:
    list(iter_instructions(data))  # well-formed opcodes...
    with pytest.raises(pickle.UnpicklingError, match=message):
        globals_of(data)           # ...that no unpickler could run


def test_trailing_data_after_stop_is_ignored() -> None:
    assert [i.opcode.name for i in iter_instructions(b"N.garbage")] == ["NONE", "STOP"]
    assert globals_of(b"N.cos\nsystem\n") == []


# -- the opcode table's stack effects, as globals_of reads them --------------------------

def test_stack_effects_match_pickletools() -> None:
    """The stack texts of the table, as globals_of reads them, agree with pickletools'."""
    theirs = {info.name: info for info in pickletools.opcodes}
    for opcode in opcodes.OPCODES:
        below, to_mark, pushes = tools._STACK_EFFECTS[opcode.name]
        before = [item.name for item in theirs[opcode.name].stack_before]
        after = theirs[opcode.name].stack_after
        assert to_mark == ("mark" in before), opcode.name
        if to_mark:
            assert below == before.index("mark"), opcode.name
            assert pushes == len(after), opcode.name
        else:
            # pickletools has PUT as "->" where the table has "any -> any": the same effect.
            assert pushes - below == len(after) - len(before), opcode.name
