"""The store's own errors: each a pstore.Error and the builtin a user would catch, naming
what failed, pickling with its facts, and leaving the store as it was."""

from __future__ import annotations

import pickle

import pytest

import pstore
from pstore import engine
from pstore.errors import (
    ArgumentError,
    ClosedError,
    Error,
    InTransactionError,
    KeyTypeError,
    PersistentClassError,
    ReferenceCycleError,
    StorePicklingError,
    UnstorableError,
)
from tests.store.objects import Config, Node, Unpicklable

ERRORS = [
    (UnstorableError("/s.db", "the value of key 'k'", "no reduce"), pickle.PicklingError),
    (ReferenceCycleError("/s.db", "the value of key 'k'"), pickle.PicklingError),
    (ArgumentError("flag", "x", "one of 'r', 'w', 'c', 'n'"), ValueError),
    (KeyTypeError("tuple"), TypeError),
    (PersistentClassError("Node", "no __slots__"), TypeError),
    (InTransactionError("/s.db", "vacuum"), RuntimeError),
    (StorePicklingError("/s.db", "inside a transaction"), TypeError),
]


def test_vacuum_and_pickling_inside_a_transaction_are_refused_with_pstore_errors(store):
    store["k"] = [1]
    with store.transaction():
        store["k"] = [2]
        with pytest.raises(InTransactionError, match="vacuum"):
            store.vacuum()
        with pytest.raises(StorePicklingError, match="inside a transaction"):
            pickle.dumps(store)
    assert store["k"] == [2]


@pytest.mark.parametrize(("error", "builtin"), ERRORS, ids=lambda e: type(e).__name__)
def test_error_is_a_pstore_error_and_the_builtin_and_pickles(error, builtin):
    assert isinstance(error, Error) and isinstance(error, builtin)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert again.args == error.args
    assert str(again) == str(error)
    assert vars(again) == vars(error)


def test_cycle_is_refused_with_reference_cycle_error_and_nothing_stored(store):
    a, b = Config("a"), Config("b")
    a.other, b.other = b, a
    with pytest.raises(ReferenceCycleError) as caught:
        with store.transaction():
            store["a"] = a
            store["b"] = b
    assert caught.value.path == store.path
    assert caught.value.what in ("the value of key 'a'", "the value of key 'b'")
    assert isinstance(caught.value, engine.PicklingError)
    assert len(store) == 0


def test_unpicklable_value_raises_unstorable_error_naming_key_and_cause(store):
    store["kept"] = [1]
    with pytest.raises(UnstorableError, match="'bad'") as caught:
        store["bad"] = [Unpicklable()]
    assert caught.value.what == "the value of key 'bad'"
    assert isinstance(caught.value.__cause__, TypeError)
    assert not isinstance(caught.value, ReferenceCycleError)
    assert dict(store.items()) == {"kept": [1]}


def test_persistent_object_of_another_store_is_refused_naming_both(opener, tmp_path):
    first = opener()
    node = Node("n")
    first["n"] = node
    with pstore.open(str(tmp_path / "other.db")) as other:
        with pytest.raises(UnstorableError, match="belongs to one store") as caught:
            other["inside"] = [node]
        assert caught.value.what == "the value of key 'inside'"
        assert repr(first.path) in caught.value.reason
        assert "inside" not in other


@pytest.mark.parametrize("key", [1, b"k", ("k",), None])
def test_non_str_key_raises_key_type_error(store, key):
    for call in (lambda: store[key], lambda: store.__setitem__(key, 1),
                 lambda: store.__delitem__(key)):
        with pytest.raises(KeyTypeError) as caught:
            call()
        assert caught.value.key_type == type(key).__name__
    assert key not in store


@pytest.mark.parametrize(("options", "name"), [
    ({"flag": "x"}, "flag"), ({"protocol": 6}, "protocol"), ({"protocol": -2}, "protocol"),
    ({"compression": "brotli"}, "compression"), ({"blob_threshold": -1}, "blob_threshold"),
    ({"backend": "nope"}, "backend"), ({"backend": "sqlite:variant"}, "backend"),
])
def test_bad_open_arguments_raise_argument_error_naming_the_argument(path, options, name):
    with pytest.raises(ArgumentError) as caught:
        pstore.open(path, **options)
    assert caught.value.name == name
    assert caught.value.value == next(iter(options.values()))


def test_closed_store_raises_closed_error_for_every_operation(opener):
    with opener() as store:
        store["k"] = [1]
        store["n"] = {"node": Node("x")}
    store = opener()
    holder = store["n"]     # its node is a placeholder: the record is read at first use
    store.close()
    calls = {
        "getitem": lambda: store["k"], "get": lambda: store.get("k"),
        "setitem": lambda: store.__setitem__("k", 2), "delitem": lambda: store.__delitem__("k"),
        "contains": lambda: "k" in store, "contains a non-str": lambda: 1 in store,
        "getitem of a non-str": lambda: store[1], "len": lambda: len(store),
        "iter": lambda: list(store), "keys": lambda: list(store.keys()),
        "items": lambda: list(store.items()), "values": lambda: list(store.values()),
        "update": lambda: store.update(k=3), "clear": store.clear, "pop": lambda: store.pop("k"),
        "setdefault": lambda: store.setdefault("z", 1), "popitem": store.popitem,
        "eq": lambda: store == {}, "sync": store.sync, "gc": store.gc,
        "transaction": lambda: store.transaction().__enter__(), "enter": store.__enter__,
    }
    for name, call in calls.items():
        with pytest.raises(ClosedError, match="closed"):
            call()
            pytest.fail(f"{name} did not raise")
    with pytest.raises(ClosedError, match="closed"):
        holder["node"].name
