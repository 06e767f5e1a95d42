"""Records referring to records: shared objects stay shared, in memory and on disk."""

from __future__ import annotations

import gc as python_gc
import sqlite3
import weakref

import pytest

from pstore import engine
from pstore.store.identity import IdentityMap

from .objects import Config


def record_count(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM records").fetchone()[0]
    finally:
        conn.close()


def test_issue_example_in_one_store(store):
    cfg = Config("cfg")
    store["config"] = cfg
    store["run1"] = {"cfg": cfg}
    store["run2"] = {"cfg": cfg}
    assert store["run1"]["cfg"] is store["run2"]["cfg"] is store["config"] is cfg


def test_shared_object_is_stored_once(opener, path, backend_name):
    big = Config("big", size=10_000)
    big.payload = b"x" * 10_000
    with opener() as store:
        store["big"] = big
        for i in range(20):
            store[f"user{i}"] = {"i": i, "big": big}
    with opener("r") as store:
        users = [store[f"user{i}"] for i in range(20)]
        assert all(user["big"] is users[0]["big"] is store["big"] for user in users)
    if backend_name == "sqlite":
        conn = sqlite3.connect(path)
        total = conn.execute("SELECT sum(length(data)) FROM records").fetchone()[0]
        conn.close()
        assert 10_000 < total < 2 * 10_000


def test_same_object_under_two_keys_is_one_record(opener, path, backend_name):
    value = {"v": 1}
    with opener() as store:
        store["a"] = value
        store["b"] = value
        value["v"] = 2
        store["a"] = value      # rewritten in place: "b" sees it
    with opener() as store:
        assert store["a"] is store["b"]
        assert store["b"] == {"v": 2}
    if backend_name == "sqlite":
        assert record_count(path) == 1


def test_rebinding_a_key_leaves_other_references_alone(opener):
    old = Config("old")
    with opener() as store:
        store["cfg"] = old
        store["run"] = {"cfg": old}
        store["cfg"] = Config("new")
        del store["cfg"]
        store.gc()
    with opener() as store:
        assert store["run"]["cfg"] == Config("old")


def test_deleting_a_key_does_not_break_references(opener):
    shared = [1, 2]
    with opener() as store:
        store["shared"] = shared
        store["user"] = (shared,)
        del store["shared"]
        assert store.gc() == 0
    with opener() as store:
        assert store["user"] == ([1, 2],)


def test_roots_may_refer_to_each_other_in_any_order(opener):
    a, b = Config("a"), Config("b")
    a.other = b
    with opener() as store:
        with store.transaction():
            store["a"] = a      # refers to b, assigned later in the same transaction
            store["b"] = b
    with opener() as store:
        assert store["a"].other is store["b"]


def test_a_held_object_whose_record_was_collected_is_written_again(opener):
    with opener() as store:
        store["x"] = Config("x")
        held = store["x"]
        del store["x"]
        store.gc()
        store["user"] = [held]
    with opener() as store:
        assert store["user"] == [Config("x")]


def test_cycle_between_records_is_refused(opener):
    store = opener()
    a, b = Config("a"), Config("b")
    a.other, b.other = b, a
    with pytest.raises(engine.PicklingError, match="back to itself"):
        with store.transaction():
            store["a"] = a
            store["b"] = b
    assert len(store) == 0
    # Closing a cycle across transactions, by rewriting a committed record.
    del a.other
    store["a"] = a
    store["b"] = b          # b -> a
    a.other = b
    with pytest.raises(engine.PicklingError, match="'a'"):
        store["a"] = a      # a -> b -> a
    with opener("r") as reader:
        assert not hasattr(reader["b"].other, "other")
    store.clear()
    store["ab"] = [a, b]     # one record: a cycle inside a record is fine
    loaded = store["ab"]
    assert loaded[0].other is loaded[1]


def test_a_long_chain_of_records_loads_without_recursion_limits(opener):
    # Each node is its own record referring to the previous one: loading the last one
    # loads the whole chain, far deeper than Python's recursion limit allows recursively.
    length = 3000
    with opener() as store, store.transaction():
        previous = None
        for i in range(length):
            node = {"i": i, "previous": previous}
            store[f"node{i}"] = node
            previous = node
    with opener("r") as store:
        node, seen = store[f"node{length - 1}"], 0
        while node["previous"] is not None:
            assert node["previous"]["i"] == node["i"] - 1
            node, seen = node["previous"], seen + 1
        assert seen == length - 1
        assert node is store["node0"]
        assert store["node1500"]["previous"] is store["node1499"]


def test_self_reference_inside_a_record(opener):
    looped = []
    looped.append(looped)
    with opener() as store:
        store["loop"] = looped
    with opener() as store:
        loaded = store["loop"]
        assert loaded[0] is loaded


def test_atoms_are_never_references(opener, path, backend_name):
    with opener() as store:
        store["flag"] = True
        store["name"] = "name"
        store["values"] = [True, "name", 1]
    with opener() as store:
        assert store["values"] == [True, "name", 1]
    if backend_name == "sqlite":
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT count(*) FROM refs").fetchone()[0] == 0
        conn.close()


def test_identity_map_does_not_keep_loaded_objects_alive(store):
    with store.transaction():
        for i in range(3000):
            store[f"k{i}"] = {"i": i}
            store[f"c{i}"] = Config(str(i))
    for i in range(3000):
        assert store[f"k{i}"] == {"i": i}
        assert store[f"c{i}"].name == str(i)
    python_gc.collect()
    store["one_more"] = [0]
    store["one_more"]
    # dicts are held strongly but swept; Config instances weakly.
    assert len(store._ids) < 2100
    for _ in store.values():   # streaming the values sweeps as it goes
        assert len(store._ids) < 2100


def test_held_objects_keep_their_identity_through_sweeps(store):
    held = store.setdefault("held", {"v": 0})
    with store.transaction():
        for i in range(5000):
            store[f"k{i}"] = [i]
    for i in range(5000):      # each read may sweep
        assert store[f"k{i}"] == [i]
    assert store["held"] is held
    store["user"] = [held]
    assert store["user"][0] is held


def test_weakly_held_objects_disappear(store):
    store["c"] = Config("c")
    ref = weakref.ref(store["c"])
    python_gc.collect()
    assert ref() is None
    assert store["c"] == Config("c")


def map_holding(held: int) -> tuple[IdentityMap, list[list[int]]]:
    """A map holding ``held`` lists that stay alive (the sweep's survivors), and them."""
    ids = IdentityMap()
    kept = [[i] for i in range(held)]
    for oid, obj in enumerate(kept):
        ids.add(obj, oid)
    return ids, kept


@pytest.mark.parametrize("held", [0, 100])
def test_sweep_drops_chains_the_map_alone_holds(held):
    # A chain of strongly held objects, each inside the next: dropping the outer one leaves
    # the next one referenced by the map alone. With nothing else in the map the sweep
    # rechecks every survivor; with many objects held, only what the dropped contained.
    ids, kept = map_holding(held)
    inner: list = ["end"]
    for oid in range(1000, 1050):
        ids.add(inner, oid)
        inner = [inner]
    ids.add(inner, 2000)
    del inner
    ids.sweep()
    assert len(ids) == held
    assert all(ids.get(oid) is obj for oid, obj in enumerate(kept))


@pytest.mark.parametrize("held", [0, 100])
def test_sweep_drops_an_object_two_dropped_ones_shared(held):
    # Two dicts holding one list: once they are dropped, the list is found inside both.
    ids, kept = map_holding(held)
    shared: list = ["shared"]
    ids.add(shared, 1000)
    for oid in (1001, 1002):
        ids.add({"list": shared}, oid)
    del shared
    ids.sweep()
    assert len(ids) == held
    assert all(ids.get(oid) is obj for oid, obj in enumerate(kept))
    assert ids.get(1000) is None and ids.get(1001) is None
