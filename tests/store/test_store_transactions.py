"""transaction(): all or nothing, in the database and in the Store's memory."""

from __future__ import annotations

import pytest

import pstore

from .objects import Config


class Boom(Exception):
    pass


def test_commit_on_clean_exit(opener):
    store = opener()
    with store.transaction() as same:
        assert same is store
        store["a"] = 1
        store["b"] = 2
        assert store["a"] == 1 and len(store) == 2
    with opener("r") as reader:
        assert dict(reader.items()) == {"a": 1, "b": 2}


def test_rollback_restores_database_and_memory(opener):
    store = opener()
    cfg = Config("cfg", size=1)
    store["cfg"] = cfg
    store["keep"] = [1]
    with pytest.raises(Boom):
        with store.transaction():
            cfg.size = 99
            store["cfg"] = cfg          # rewrite of an existing record
            new = Config("new")
            store["new"] = new          # a new record
            store["user"] = {"new": new, "cfg": cfg}
            del store["keep"]
            assert store["new"] is new and "keep" not in store
            raise Boom
    # Memory: the rewritten object reloads its committed state; new objects are forgotten.
    assert store["cfg"].size == 1 and store["cfg"] is not cfg
    assert "new" not in store and "user" not in store and store["keep"] == [1]
    assert sorted(store) == ["cfg", "keep"]
    assert id(new) not in store._ids.oid_of
    # A held object assigned again after the rollback still rewrites its own record.
    store["cfg"] = cfg
    store["other"] = [cfg]
    assert store["other"][0] is store["cfg"]
    store.close()
    with opener("r") as reader:
        assert reader["cfg"].size == 99 and reader["other"][0] is reader["cfg"]
        # The object first stored in the rolled-back transaction gets a fresh record.


def test_object_first_stored_in_a_rolled_back_transaction_is_stored_again(opener):
    store = opener()
    new = Config("new")
    with pytest.raises(Boom):
        with store.transaction():
            store["new"] = new
            raise Boom
    store["new"] = new
    store["again"] = [new]
    store.close()
    with opener("r") as reader:
        assert reader["again"][0] is reader["new"]


def test_nested_transaction_joins_the_outer(opener):
    store = opener()
    with pytest.raises(Boom):
        with store.transaction():
            store["outer"] = 1
            with store.transaction():
                store["inner"] = 2
            assert store["inner"] == 2
            raise Boom
    assert len(store) == 0
    with store.transaction():
        with store.transaction():
            store["inner"] = 2
        store["outer"] = 1
    with opener("r") as reader:
        assert sorted(reader) == ["inner", "outer"]


def test_each_assignment_outside_a_transaction_commits(opener):
    store = opener()
    reader = opener("r")
    store["a"] = 1
    assert reader["a"] == 1
    with store.transaction():
        store["b"] = 2
        assert "b" not in reader     # not yet committed; the reader is not blocked
    assert reader["b"] == 2


def test_unpicklable_value_in_a_transaction_rolls_it_all_back(store):
    from pstore import engine

    from .objects import Unpicklable
    store["a"] = 1
    with pytest.raises(engine.PicklingError, match="'bad'"):
        with store.transaction():
            store["a"] = 2
            store["bad"] = Unpicklable()
    assert store["a"] == 1 and "bad" not in store


def test_mutation_after_assignment_in_a_transaction_is_committed(opener):
    # Values are pickled at commit: the transaction stores their final state.
    store = opener()
    value = {"v": 1}
    with store.transaction():
        store["k"] = value
        value["v"] = 2
    with opener("r") as reader:
        assert reader["k"] == {"v": 2}


def test_every_read_in_a_transaction_sees_the_keys_it_bound(opener):
    # Keys bound in a transaction reach the backend together (Backend.bind_keys), at the
    # first read of keys or the commit: each kind of read must see them. (Their records
    # are written at the commit: tools reading records refuse them until then, below.)
    store = opener()
    store["old"] = "old"
    reads = {
        "get": lambda: store["k1"],
        "in": lambda: "k1" in store,
        "len": lambda: len(store),
        "iter": lambda: sorted(store),
        "items": lambda: sorted(store.items()),
        "info": lambda: store.info().keys,
    }
    seen = {}
    for name, read in reads.items():
        with pytest.raises(Boom):
            with store.transaction():
                store["k1"] = "one"
                store["k2"] = "two"
                seen[name] = read()
                raise Boom
    assert seen == {"get": "one", "in": True, "len": 3, "iter": ["k1", "k2", "old"],
                    "items": [("k1", "one"), ("k2", "two"), ("old", "old")],
                    "info": 3}
    assert sorted(store) == ["old"]


def test_record_tools_in_a_transaction_refuse_records_not_written_yet(opener):
    # describe, raw_record, verify and globals read records' bytes. A value assigned in a
    # transaction has its key bound but its record made only at commit: rather than
    # report it missing (verify would call the store damaged), they say so, and leave the
    # transaction as it was.
    store = opener()
    store["old"] = ["old"]
    with store.transaction():
        assert store.verify().ok and store.raw_record("old")[0] > 0     # nothing pending
        store["new"] = ["new"]
        assert store.raw_record("old")[0] > 0 and store.globals("old") == []
        for tool, what in ((lambda: store.raw_record("new"), "the record of key 'new'"),
                           (lambda: store.globals("new"), "the record of key 'new'"),
                           (lambda: list(store.describe()), "every record"),
                           (store.verify, "every record"), (store.globals, "every record")):
            with pytest.raises(pstore.InTransactionError, match=f"before {what} is written"):
                tool()
    assert store.verify().ok and store["new"] == ["new"]
    assert sorted(key for key, _ in store.describe()) == ["new", "old"]


def test_a_key_no_backend_can_store_is_refused_at_once(opener):
    # A lone surrogate does not encode to UTF-8: refused where it is given, not when the
    # queued binding reaches the backend (a later read, or the commit).
    store = opener()
    store["kept"] = 1
    bad = "bad\ud800"
    with pytest.raises(pstore.ArgumentError, match="encodes to UTF-8"):
        store[bad] = 1
    with store.transaction():
        store["new"] = 2
        with pytest.raises(pstore.ArgumentError, match="encodes to UTF-8"):
            store[bad] = 3
        assert bad not in store and len(store) == 2
    with pytest.raises(pstore.ArgumentError):
        store[bad]
    assert dict(store.items()) == {"kept": 1, "new": 2}


def test_a_failed_binding_is_never_dropped_from_the_transaction(opener, path, backend_name):
    # A binding the backend refuses (here a key whose stored seal was tampered with) fails
    # the read that sends it; caught, the transaction still cannot commit without it.
    if backend_name != "sqlite":
        pytest.skip("writes the SQLite file directly")
    import sqlite3
    store = opener()
    store["k"] = "old"
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE keys SET seal = ? WHERE key = 'k'", (bytes(8),))
    with pytest.raises(pstore.CorruptionError):
        with store.transaction():
            store["other"] = "new"
            store["k"] = "new"
            with pytest.raises(pstore.CorruptionError, match="'k'"):
                len(store)
    assert "other" not in store


def test_iteration_in_a_transaction_sees_keys_bound_while_it_runs(opener):
    store = opener()
    store.update({f"k{i:04}": i for i in range(2500)})
    seen = []
    with store.transaction():
        for key in store:
            if key == "k0010":
                store["k2000x"] = "bound while iterating"
                store["zzz"] = "bound while iterating"
            seen.append(key)
        assert store["zzz"] == "bound while iterating"
    assert "zzz" in seen and "k2000x" in seen and len(seen) == 2502


def test_trust_in_a_transaction_leaves_values_assigned_in_it_to_the_commit(opener):
    store = opener()
    store["old"] = ["old"]
    with store.transaction():
        store["new"] = ["new"]      # its record is written (signed) at the commit
        assert store.trust("new") == 0 and store.trust() == 0
    assert store["new"] == ["new"] and store.verify().ok


def test_rebinding_and_deleting_keys_in_one_transaction(opener):
    store = opener()
    store["a"] = ["first a"]
    store["b"] = ["b"]
    with store.transaction():
        store["a"] = ["second a"]
        store["a"] = ["third a"]    # the second value's record is never kept
        store["new"] = ["new"]
        del store["new"]
        del store["b"]
        store["b"] = ["b again"]
        store["c"] = ["c"]
        store.clear()
        store["d"] = ["d"]
    assert dict(store.items()) == {"d": ["d"]}
    # Every record but d's was released and deleted at commit: nothing left for gc.
    assert store.info().records == 1 and store.gc() == 0
    with opener("r") as reader:
        assert dict(reader.items()) == {"d": ["d"]}


def test_bulk_assignment_rebinding_many_existing_keys(opener):
    # More keys than one batch of binds, half new and half bound already.
    store = opener()
    with store.transaction():
        for i in range(1500):
            store[f"k{i}"] = i
    with store.transaction():
        for i in range(750, 2250):
            store[f"k{i}"] = -i
    assert len(store) == 2250 and store.info().records == 2250 and store.gc() == 0
    with opener("r") as reader:
        assert all(reader[f"k{i}"] == (i if i < 750 else -i) for i in range(2250))
