"""pstore.engine loads pickles written by other Pythons exactly as the stdlib does.

The corpus under tests/data/corpus/<version>/ was written by Python 2.7 and 3.6
to 3.13 (tests/data/make_corpus.py). For every file and for the encodings
'ASCII', 'latin1' and 'bytes', ``pstore.engine.loads`` must give what
``pickle.loads`` gives -- the same object graph, sharing and cycles included --
or raise the same exception type. Every prefix of a sample of the files must
fail with the exception type ``pickle.loads`` raises for it.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import hashlib
import json
import pickle
import sys
import types
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pstore import engine

DATA = Path(__file__).resolve().parent.parent / "data"
CORPUS = DATA / "corpus"
# The corpus pickles refer to the module as the top-level "corpus_classes".
sys.path.insert(0, str(DATA))

import corpus_classes  # noqa: E402

#: The versions the corpus covers and the highest protocol of each.
VERSIONS = {"2.7": 2, "3.6": 4, "3.7": 4, "3.8": 5, "3.9": 5, "3.10": 5, "3.11": 5,
            "3.12": 5, "3.13": 5}
ENCODINGS = ("ASCII", "latin1", "bytes")

# Every test twice: with the C fast path and in pure Python (conftest.py).
pytestmark = pytest.mark.usefixtures("engine_mode")
#: Values whose every truncation is checked, at protocols 0, 2 and the highest.
TRUNCATION_SAMPLE = ("mixed", "recursive_via_tuple", "shared_instance", "with_state",
                     "with_newargs", "old_style", "datetime", "str_escapes", "decimal_special",
                     "ordereddict", "floats", "bytes_high", "int_huge_neg", "list_1001")


def _manifest(version: str) -> dict[str, Any]:
    return json.loads((CORPUS / version / "MANIFEST.json").read_text("ascii"))


def _entries() -> list[tuple[str, dict[str, Any]]]:
    return [(version, entry) for version in VERSIONS for entry in _manifest(version)["entries"]]


ENTRIES = _entries()


def _read(version: str, entry: dict[str, Any]) -> bytes:
    return (CORPUS / version / entry["file"]).read_bytes()


# -- comparing object graphs ----------------------------------------------------------------

#: Types compared by type and repr: immutable values whose identity is no contract.
_VALUE_TYPES = (type(None), bool, int, float, complex, str, bytes, decimal.Decimal,
                fractions.Fraction, uuid.UUID, datetime.date, datetime.time,
                datetime.datetime, datetime.timedelta, datetime.tzinfo)
_MISSING = object()


class GraphMismatch(AssertionError):
    """Two object graphs differ; the message names the path to the first difference."""


class _GraphComparer:
    """Walk two object graphs in step, requiring equal values and the same sharing.

    Containers and instances are matched one to one: if ``ours`` reaches one
    object by two paths, ``theirs`` must reach one object by the same two paths,
    and vice versa -- which also covers cycles.
    """

    def __init__(self) -> None:
        self.pairs: dict[int, int] = {}
        self.reverse: dict[int, int] = {}

    def compare(self, ours: Any, theirs: Any, path: str) -> None:
        if type(ours) is not type(theirs):
            raise GraphMismatch(f"{path}: {type(ours).__name__} != {type(theirs).__name__}")
        if isinstance(ours, _VALUE_TYPES):
            if repr(ours) != repr(theirs):
                raise GraphMismatch(f"{path}: {ours!r} != {theirs!r}")
            return
        if isinstance(ours, (type, types.BuiltinFunctionType, types.FunctionType)):
            if ours is not theirs:
                raise GraphMismatch(f"{path}: {ours!r} is not {theirs!r}")
            return
        if id(ours) in self.pairs or id(theirs) in self.reverse:
            if (self.pairs.get(id(ours)) != id(theirs)
                    or self.reverse.get(id(theirs)) != id(ours)):
                raise GraphMismatch(f"{path}: shared differently")
            return
        self.pairs[id(ours)] = id(theirs)
        self.reverse[id(theirs)] = id(ours)
        self._children(ours, theirs, path)

    def _sequence(self, ours: Any, theirs: Any, path: str) -> None:
        ours, theirs = list(ours), list(theirs)
        if len(ours) != len(theirs):
            raise GraphMismatch(f"{path}: length {len(ours)} != {len(theirs)}")
        for index, (mine, other) in enumerate(zip(ours, theirs, strict=True)):
            self.compare(mine, other, f"{path}[{index}]")

    def _children(self, ours: Any, theirs: Any, path: str) -> None:
        if isinstance(ours, bytearray):
            if ours != theirs:
                raise GraphMismatch(f"{path}: {ours!r} != {theirs!r}")
        elif isinstance(ours, (list, tuple)):
            self._sequence(ours, theirs, path)
        elif isinstance(ours, collections.deque):
            self.compare(ours.maxlen, theirs.maxlen, f"{path}.maxlen")
            self._sequence(ours, theirs, path)
        elif isinstance(ours, dict):
            # Insertion order is part of the value (OrderedDict, and dicts since 3.7).
            self._sequence(ours.keys(), theirs.keys(), f"{path}.keys()")
            self._sequence(ours.values(), theirs.values(), f"{path}.values()")
            if isinstance(ours, collections.defaultdict):
                self.compare(ours.default_factory, theirs.default_factory,
                             f"{path}.default_factory")
        elif isinstance(ours, (set, frozenset)):
            # Iteration order may depend on how the set was grown: compare in repr order.
            self._sequence(sorted(ours, key=repr), sorted(theirs, key=repr), f"{path}{{}}")
        else:
            self._instance(ours, theirs, path)

    def _instance(self, ours: Any, theirs: Any, path: str) -> None:
        if hasattr(ours, "__dict__") or hasattr(theirs, "__dict__"):
            self.compare(getattr(ours, "__dict__", None), getattr(theirs, "__dict__", None),
                         f"{path}.__dict__")
        for cls in type(ours).__mro__:
            slots = cls.__dict__.get("__slots__", ())
            for name in (slots,) if isinstance(slots, str) else slots:
                mine = getattr(ours, name, _MISSING)
                other = getattr(theirs, name, _MISSING)
                if (mine is _MISSING) != (other is _MISSING):
                    raise GraphMismatch(f"{path}.{name}: set on one side only")
                if mine is not _MISSING:
                    self.compare(mine, other, f"{path}.{name}")


def assert_same_graph(ours: Any, theirs: Any) -> None:
    """Raise GraphMismatch unless the two object graphs are equal, sharing included."""
    _GraphComparer().compare(ours, theirs, "value")


def _outcome(loads: Callable[..., Any], data: bytes, encoding: str) -> tuple[bool, Any]:
    """(True, result) if ``loads`` succeeds, else (False, the exception)."""
    try:
        return True, loads(data, encoding=encoding)
    except Exception as error:  # the type is compared with the stdlib's
        return False, error


def assert_loads_like_stdlib(data: bytes, encoding: str) -> None:
    """pstore.engine.loads gives the stdlib's result, or raises the stdlib's exception type."""
    expected_ok, expected = _outcome(pickle.loads, data, encoding)
    ok, got = _outcome(engine.loads, data, encoding)
    if not expected_ok:
        assert not ok, f"stdlib raised {expected!r}, pstore returned {got!r}"
        assert type(got) is type(expected), f"pstore raised {got!r}, stdlib {expected!r}"
    elif not ok:
        raise AssertionError(f"stdlib succeeded, pstore raised {got!r}") from got
    else:
        assert_same_graph(got, expected)


# -- the corpus itself ------------------------------------------------------------------------


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_manifest_lists_every_file_with_its_hash(version: str) -> None:
    manifest = _manifest(version)
    assert manifest["python"].startswith(version + ".")
    listed = {entry["file"] for entry in manifest["entries"]}
    on_disk = {path.name for path in (CORPUS / version).glob("*.pickle")}
    assert listed == on_disk
    for entry in manifest["entries"]:
        assert entry["file"] == f"{entry['name']}-p{entry['protocol']}.pickle"
        assert hashlib.sha256(_read(version, entry)).hexdigest() == entry["sha256"]
    protocols = {entry["protocol"] for entry in manifest["entries"]}
    assert protocols == set(range(VERSIONS[version] + 1))
    # Every version has at least the values Python 2.7 could pickle.
    names = {entry["name"] for entry in manifest["entries"]}
    python2_names = {entry["name"] for entry in _manifest("2.7")["entries"]}
    assert len(python2_names) > 80 and python2_names <= names


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_stdlib_loads_the_corpus(version: str) -> None:
    """The oracle works: with latin1 the stdlib loads every file, into the expected types."""
    for entry in _manifest(version)["entries"]:
        value = pickle.loads(_read(version, entry), encoding="latin1")
        if entry["name"] == "with_state":
            assert isinstance(value, corpus_classes.WithState) and value.restored
        elif entry["name"] == "recursive_list":
            assert value[0] is value
        elif entry["name"] == "shared_sublists":
            assert value[0] is value[1] is value[2]["x"] is value[3][0]


def test_graph_comparison_can_fail() -> None:
    shared = [1]
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    slotted = corpus_classes.Slotted(1, 2)
    cases = [
        ([shared, shared], [[1], [1]]),
        ([[1], [1]], [shared, shared]),
        (cyclic, [[]]),
        (0.0, -0.0),
        (float("nan"), 1.0),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        (b"a", "a"),
        (collections.deque([1], maxlen=2), collections.deque([1])),
        (slotted, corpus_classes.Slotted(1, 3)),
        (corpus_classes.NewStyle(1), corpus_classes.NewStyle(2)),
        ({1, 2}, {1, 3}),
    ]
    for ours, theirs in cases:
        with pytest.raises(GraphMismatch):
            assert_same_graph(ours, theirs)
    assert_same_graph([float("nan"), cyclic, {1, 2}], [float("nan"), cyclic, {2, 1}])


@pytest.mark.parametrize(("version", "entry"), ENTRIES,
                         ids=[f"{version}/{entry['file']}" for version, entry in ENTRIES])
def test_loads_like_stdlib(version: str, entry: dict[str, Any]) -> None:
    data = _read(version, entry)
    for encoding in ENCODINGS:
        assert_loads_like_stdlib(data, encoding)


def _truncation_cases() -> list[tuple[str, dict[str, Any]]]:
    return [(version, entry) for version, entry in ENTRIES
            if entry["name"] in TRUNCATION_SAMPLE
            and entry["protocol"] in (0, 2, VERSIONS[version])]


TRUNCATION_CASES = _truncation_cases()


@pytest.mark.parametrize(("version", "entry"), TRUNCATION_CASES,
                         ids=[f"{version}/{entry['file']}" for version, entry in TRUNCATION_CASES])
def test_truncated_pickles_fail_like_stdlib(version: str, entry: dict[str, Any]) -> None:
    data = _read(version, entry)
    for size in range(len(data)):
        prefix = data[:size]
        expected_ok, expected = _outcome(pickle.loads, prefix, "latin1")
        assert not expected_ok, f"stdlib loaded a {size}-byte prefix"
        ok, got = _outcome(engine.loads, prefix, "latin1")
        assert not ok, f"pstore loaded a {size}-byte prefix: {got!r}"
        assert type(got) is type(expected), (
            f"{size}-byte prefix: pstore raised {got!r}, stdlib {expected!r}")
