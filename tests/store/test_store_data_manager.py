"""The data-manager protocol (pstore/store/persistent.py, DataManager): all a Persistent
object asks of its store is ``setstate`` and ``register``. Run here against a second,
minimal data manager as well as the Store, so the protocol is all the object relies on."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest

import pstore
from pstore.store.persistent import DataManager, Persistent, fill, ghostify, placeholder
from tests.store.objects import Node


class StateTable:
    """A data manager keeping each object's state in a dict: object id -> state."""

    path = "<memory>"

    def __init__(self, states: dict[int, Any]) -> None:
        self.states = states
        self.calls: list[tuple[str, int]] = []

    def setstate(self, obj: Persistent) -> None:
        self.calls.append(("setstate", obj._p_oid))
        fill(obj, lambda: self.states[obj._p_oid])

    def register(self, obj: Persistent) -> None:
        self.calls.append(("register", obj._p_oid))


def test_a_placeholder_asks_its_manager_for_its_state_once_then_registers_changes():
    manager: DataManager = StateTable({7: {"name": "seven", "children": []}})
    node = placeholder(Node, manager, 7)
    assert node._p_changed is None and manager.calls == []
    assert isinstance(node, Node)        # no load for the class
    assert node.name == "seven"
    assert node.children == []
    assert manager.calls == [("setstate", 7)]
    node.name = "changed"
    assert manager.calls == [("setstate", 7), ("register", 7)]
    ghostify(node)
    manager.states.clear()
    with pytest.raises(KeyError):       # the manager's own failure reaches the caller
        node.name
    assert node._p_changed is None      # still a placeholder after the failed load


def test_the_store_is_the_data_manager_of_what_it_loads(opener):
    with opener() as store:
        store["n"] = Node("n", [Node("child")])
    store = opener()
    child = store["n"].children[0]
    assert child._p_store is store and child._p_changed is None
    store.setstate(child)
    assert child._p_changed is False and child.name == "child"
    child.name = "renamed"      # register: written at the next commit
    store.close()
    with opener() as store:
        assert store["n"].children[0].name == "renamed"


def test_a_dropped_store_is_freed_without_the_garbage_collector(path, backend_name):
    """The codec, the loader and the transaction refer back to the Store weakly, so that
    dropping the last reference frees it (and its connection) at once."""
    store = pstore.open(path, backend=backend_name)
    store["k"] = [1]
    store["j"] = [store["k"], Node("n")]
    store["j"][1].name = "changed"
    store.sync()
    rooms = [weakref.ref(store), weakref.ref(store._loader), weakref.ref(store._txn)]
    store.close()
    gc.disable()
    try:
        del store
        assert [room() for room in rooms] == [None, None, None]
    finally:
        gc.enable()
