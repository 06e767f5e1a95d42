"""Persistent objects: own records, change tracking, lazy loading, invalidation, rollback;
and writeback that writes only what changed."""

from __future__ import annotations

import copy
import multiprocessing
import pickle

import pytest

import pstore
from pstore import engine
from pstore.errors import ClosedError, MissingObjectError

from . import store_workers
from .objects import Config, Node, Tagged

spawn = multiprocessing.get_context("spawn")


def run(function, *args):
    with spawn.Pool(1) as pool:
        return pool.apply(function, args)


class Boom(Exception):
    pass


# -- records of their own, and references to them --------------------------------------------

def test_a_persistent_object_gets_its_own_record_wherever_it_appears(opener):
    leaf = Node("leaf")
    holder = Config("holder")
    holder.leaf = leaf
    with opener() as store:
        store["list"] = [leaf]
        store["dict"] = {"leaf": leaf}
        store["attr"] = holder
        assert leaf._p_store is store
        assert leaf._p_oid not in (None, store._ids.oid_of[id(holder)])
    with opener("r") as store:
        loaded = store["list"][0]
        assert isinstance(loaded, Node) and loaded.name == "leaf"
        assert store["dict"]["leaf"] is loaded is store["attr"].leaf


def test_cycles_across_keys_survive_reopening_with_identity(opener):
    a, b = Node("a"), Node("b")
    a.other, b.other = b, a
    a.children.append(a)            # and one through itself
    with opener() as store:
        store["a"] = a              # b gets its record as a's attribute
        store["b"] = b
    with opener("r") as store:
        a, b = store["a"], store["b"]
        assert a.other is b and b.other is a and a.children[0] is a
        assert (a.name, b.name) == ("a", "b")


def test_a_cycle_closed_by_a_later_assignment(opener):
    with opener() as store:
        store["a"] = Node("a")
        store["b"] = Node("b", [store["a"]])
        store["a"].children.append(store["b"])
        store["a"]._p_changed = True
    with opener("r") as store:
        assert store["a"].children[0] is store["b"] and store["b"].children[0] is store["a"]


@pytest.mark.slow
def test_cycles_survive_reopening_in_another_process(opener, path, backend_name):
    run(store_workers.build_cycle, backend_name, path)
    assert run(store_workers.check_cycle, backend_name, path)
    with opener("r") as store:
        assert store["a"].other.other is store["a"]


def test_plain_records_in_a_cycle_through_a_persistent_object_are_accepted(opener):
    # plain -> plain -> Persistent -> plain: loading stops at the Persistent object.
    first, second, node = {"name": "first"}, {"name": "second"}, Node("node")
    with opener() as store:
        store["first"] = first
        store["second"] = second
        store["node"] = node
        first["next"] = second
        store["first"] = first          # first -> second
        second["node"] = node
        store["second"] = second        # second -> node (lazily)
        node.back = first
        store.sync()                    # node -> first: a cycle, through node
        with store.transaction():       # rewriting a plain record of the cycle
            first["n"] = 1
            store["first"] = first
    with opener("r") as store:
        first = store["first"]
        assert first["next"]["node"].back is first and first["n"] == 1


def test_plain_records_in_a_cycle_are_still_refused(opener):
    first, second = {"name": "first"}, {"name": "second"}
    store = opener()
    store["first"] = first
    second["first"] = first
    store["second"] = second
    first["second"] = second
    with pytest.raises(engine.PicklingError, match="back to itself"):
        store["first"] = first


@pytest.mark.parametrize("protocol", range(6))
def test_every_protocol_refers_to_persistent_objects(opener, protocol):
    a = Node("a")
    a.other = Node("b", [a])
    with opener(protocol=protocol) as store:
        store["a"] = a
        store["plain"] = [a.other, {"x": 1}]
        store["x"] = store["plain"][1]
        store["plain"] = [a.other, store["x"]]
    with opener("r") as store:
        a = store["a"]
        assert a.other.children[0] is a and store["plain"][0] is a.other
        assert store["plain"][1] is store["x"]


def test_a_custom_state(opener):
    with opener() as store:
        store["t"] = [Tagged("one")]
        store["t"][0].tag = "two"
    with opener("r") as store:
        assert store["t"][0].tag == "two"


def test_a_persistent_object_belongs_to_one_store(opener, tmp_path):
    node = Node("n")
    with opener() as store, pstore.open(tmp_path / "other.db") as other:
        store["n"] = node
        with pytest.raises(engine.PicklingError, match="belongs to one store"):
            other["n"] = node
        with pytest.raises(engine.PicklingError, match="belongs to one store"):
            other["list"] = [node]
        assert "n" not in other and "list" not in other
        other["copy"] = copy.deepcopy(node)
        assert other["copy"].name == "n" and other["copy"]._p_store is other


def test_slots_are_refused():
    with pytest.raises(TypeError, match="__slots__"):
        class Slotted(pstore.Persistent):
            __slots__ = ("x",)


# -- lazy loading ----------------------------------------------------------------------------

@pytest.mark.slow
def test_loading_one_key_of_a_large_graph_reads_one_record(counting_opener, backend_name):
    # 100,000 Persistent objects, each with up to 10 children (10,000 on the DBM backend,
    # whose writes are slower: what is counted is the Store's doing, not the backend's).
    size = 100_000 if backend_name == "sqlite" else 10_000
    nodes = [Node(str(i)) for i in range(size)]
    for i, node in enumerate(nodes):
        node.children = nodes[10 * i + 1:10 * i + 11]
    with counting_opener() as store:
        store["root"] = nodes[0]
        assert store.counts["writes"] == size
    del nodes, node
    store = counting_opener("r")
    root = store["root"]
    assert root.name == "0" and len(root.children) == 10
    assert all(isinstance(child, Node) for child in root.children)
    assert all(child._p_changed is None for child in root.children)   # placeholders
    assert store.counts["reads"] == 1
    assert root.children[3].children[4].name == "45"
    assert store.counts["reads"] == 3


def test_a_placeholder_is_of_its_class_and_loads_on_first_access(counting_opener):
    with counting_opener() as store:
        store["root"] = Node("root", [Node("child")])
    store = counting_opener("r")
    child = store["root"].children[0]
    assert isinstance(child, Node) and type(child) is Node and child.__class__ is Node
    assert child._p_changed is None and child._p_oid is not None
    assert store.counts["reads"] == 1
    assert vars(child) == {"name": "child", "children": []}
    assert child._p_changed is False and store.counts["reads"] == 2


def test_a_placeholder_whose_record_was_removed_names_its_object_id(opener):
    store = opener()
    store["root"] = Node("root", [Node("child")])
    with opener() as reader:
        child = reader["root"].children[0]
        oid = child._p_oid
        del store["root"]
        assert store.gc() == 1
        with pytest.raises(MissingObjectError, match=f"object id {oid}") as raised:
            child.name
        assert raised.value.object_id == oid and "placeholder" in str(raised.value)
        assert isinstance(raised.value, pstore.Error) and isinstance(raised.value, KeyError)


def test_a_placeholder_of_a_closed_store_raises_closed_error(opener):
    with opener() as store:
        store["root"] = Node("root", [Node("child")])
    with opener("r") as store:
        root = store["root"]
    assert root.name == "root" and root._p_store is None     # loaded: now a plain object
    with pytest.raises(ClosedError):
        root.children[0].name


# -- change tracking -------------------------------------------------------------------------

def test_attribute_changes_persist_without_reassigning_the_key(opener):
    with opener() as store:
        store["n"] = Node("n", [Node("child")])
    with opener() as store:
        node = store["n"]
        node.name = "renamed"
        node.children[0].extra = 1
        del node.children[0].children
        assert node._p_changed is True
    with opener() as store:
        node = store["n"]
        assert node.name == "renamed"
        assert vars(node.children[0]) == {"name": "child", "extra": 1}


def test_changes_are_written_at_the_next_commit(opener):
    store = opener()
    reader = opener("r")
    store["n"] = Node("n")
    node = store["n"]
    node.size = 1
    assert not hasattr(reader["n"], "size")         # not yet committed
    store["other"] = 0                              # any commit writes it
    assert reader["n"].size == 1 and node._p_changed is False
    node.size = 2
    store.sync()
    assert reader["n"].size == 2
    with store.transaction():
        node.size = 3
        assert reader["n"].size == 2
    assert reader["n"].size == 3


def test_only_changed_objects_are_written(counting_opener):
    with counting_opener() as store:
        store["root"] = Node("root", [Node(str(i)) for i in range(10)])
    store = counting_opener()
    root = store["root"]
    root.children[3].name = "three"
    root.children[3].name = "3"                     # marked once, written once
    root.children[5]._p_changed = True
    store.sync()
    assert store.counts["writes"] == 2
    store["again"] = root                           # binding a key to a saved object
    assert store.counts["writes"] == 2
    store.close()


def test_in_place_mutation_of_a_plain_attribute_needs_p_changed(opener):
    with opener() as store:
        store["n"] = Node("n")
    with opener() as store:
        store["n"].children.append("not seen")
    with opener() as store:
        node = store["n"]
        assert node.children == []
        node.children.append("seen")
        node._p_changed = True
        with pytest.raises(ValueError):
            node._p_changed = False
    with opener("r") as store:
        assert store["n"].children == ["seen"]


def test_persistent_list_and_dict_mutations_persist(opener):
    with opener() as store:
        store["list"] = pstore.PersistentList([3, 1])
        store["dict"] = pstore.PersistentDict(a=1)
    with opener() as store:
        items, mapping = store["list"], store["dict"]
        items.append(2)
        items.sort()
        items += [4]
        mapping["b"] = 2
        mapping.update(c=3)
        del mapping["a"]
        mapping.setdefault("d", 4)
    with opener() as store:
        assert store["list"] == [1, 2, 3, 4] and list(store["list"]) == [1, 2, 3, 4]
        assert dict(store["dict"]) == {"b": 2, "c": 3, "d": 4}
        store["dict"].pop("b")
        store["list"][0] = 0
    with opener("r") as store:
        assert dict(store["dict"]) == {"c": 3, "d": 4} and store["list"][0] == 0
        copied = store["dict"].copy()
        assert copied == {"c": 3, "d": 4} and copied._p_oid is None


def test_changes_on_a_read_only_store_stay_in_memory(opener):
    with opener() as store:
        store["n"] = Node("n")
    with opener("r") as store:
        node = store["n"]
        node.name = "changed"
        assert store["n"].name == "changed" and node._p_changed is False
    with opener("r") as store:
        assert store["n"].name == "n"


def test_an_exception_in_the_with_block_drops_the_changes(opener):
    with opener() as store:
        store["n"] = Node("n")
    with pytest.raises(Boom):
        with opener() as store:
            store["n"].name = "changed"
            raise Boom
    with opener("r") as store:
        assert store["n"].name == "n"


# -- other processes and rollback ------------------------------------------------------------

@pytest.mark.slow
def test_another_process_sees_a_committed_change_on_its_next_read(opener, path, backend_name):
    store = opener()
    store["n"] = Node("n", [Node("child")])
    node = store["n"]
    child = node.children[0]
    assert child.name == "child"
    run(store_workers.set_attribute, backend_name, path, "n", "name", "renamed")
    run(store_workers.change_child, backend_name, path, "n", "renamed child")
    # The next read sees both; the objects held here are the same objects, reloaded.
    assert store["n"] is node and node.name == "renamed"
    assert node.children[0] is child and child.name == "renamed child"
    # Changes not yet committed here are kept, and win at the next commit.
    node.name = "mine"
    run(store_workers.set_attribute, backend_name, path, "n", "name", "theirs")
    assert store["n"].name == "mine"
    store.sync()
    with opener("r") as reader:
        assert reader["n"].name == "mine"


def test_rollback_restores_the_objects_it_touched(opener):
    store = opener()
    store["n"] = Node("n", [Node("child")])
    node = store["n"]
    child = node.children[0]
    with pytest.raises(Boom):
        with store.transaction():
            node.name = "changed"
            child.children = pstore.PersistentList(["x"])
            fresh = Node("fresh")
            node.fresh = fresh
            store["fresh"] = Node("fresh too")
            raise Boom
    assert node.name == "n" and not hasattr(node, "fresh") and child.children == []
    assert store["n"] is node and node.children[0] is child
    # Objects first stored by the transaction belong to no store again, with their state.
    assert fresh._p_oid is None and fresh._p_store is None and fresh.name == "fresh"
    assert "fresh" not in store
    node.fresh = fresh
    store.sync()
    with opener("r") as reader:
        assert reader["n"].fresh.name == "fresh"


def test_a_failed_commit_restores_the_changed_objects(opener):
    from .objects import Unpicklable
    store = opener()
    store["n"] = Node("n")
    node = store["n"]
    node.name = "changed"
    with pytest.raises(engine.PicklingError):
        store["bad"] = Unpicklable()
    assert node.name == "n" and node._p_changed is False


# -- outside a store -------------------------------------------------------------------------

def test_pickling_outside_a_store_gives_an_ordinary_copy(opener):
    with opener() as store:
        store["n"] = Node("n", [Node("child")])
    with opener("r") as store:
        node = store["n"]
        for clone in (engine.loads(engine.dumps(node)), pickle.loads(pickle.dumps(node)),
                      copy.deepcopy(node)):
            assert type(clone) is Node and clone is not node
            assert clone._p_oid is None and clone._p_store is None
            assert clone.name == "n" and clone.children[0].name == "child"
            assert clone.children[0]._p_store is None
        shallow = copy.copy(node)
        assert shallow.children is node.children and shallow._p_oid is None


def test_engine_dumps_matches_the_stdlib_for_persistent_objects():
    node = Node("n", [Node("child")])
    for protocol in range(6):
        assert engine.dumps(node, protocol) == pickle.dumps(node, protocol)


# -- writeback -------------------------------------------------------------------------------

def test_writeback_writes_only_the_values_that_changed(counting_opener):
    with counting_opener() as store:
        for i in range(10):
            store[f"k{i}"] = {"i": i, "items": [i]}
    store = counting_opener(writeback=True)
    values = [store[f"k{i}"] for i in range(10)]
    values[2]["items"].append("x")
    values[7]["i"] = -7
    store.sync()
    assert store.counts["writes"] == 2
    values[2]["items"].append("y")      # the cache is written back once per sync
    store.close()
    assert store.counts["writes"] == 2
    store = counting_opener(writeback=True)
    assert store["k2"] == {"i": 2, "items": [2, "x"]} and store["k7"]["i"] == -7
    for _ in store.items():
        pass
    store["k1"]["new"] = True
    store["k3"] = store["k3"]           # an assignment is always written
    store["k3"]["new"] = True           # and changed after it: written back again
    store.close()
    assert store.counts["writes"] == 3


def test_writeback_keeps_changes_other_processes_made_to_values_not_changed_here(opener):
    with opener() as store:
        store["a"], store["b"] = [1], [1]
    store = opener(writeback=True)
    a = store["a"]
    store["b"]      # read, so cached for write-back, and left unchanged
    with opener() as other:
        other["b"] = [2]
    a.append(2)
    store.close()
    with opener("r") as reader:
        assert reader["a"] == [1, 2] and reader["b"] == [2]
