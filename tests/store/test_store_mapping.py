"""The Store as a mapping: keys, values, bad input, lifetime, threads."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

import pstore
from pstore import engine
from pstore.errors import ClosedError, FormatError, ReadOnlyError

from .objects import Config, Unpicklable


def test_mapping_basics(store):
    assert len(store) == 0 and list(store) == []
    store["a"] = 1
    store["b"] = [1, 2]
    store["c"] = {"x": Config("c")}
    assert store["a"] == 1 and store["b"] == [1, 2] and store["c"]["x"] == Config("c")
    assert "a" in store and "z" not in store and 1 not in store
    assert sorted(store) == ["a", "b", "c"] and len(store) == 3
    assert dict(store.items())["b"] == [1, 2]
    del store["a"]
    assert "a" not in store
    with pytest.raises(KeyError):
        store["a"]
    with pytest.raises(KeyError):
        del store["a"]
    assert store.get("a", 5) == 5
    store.update({"d": 4}, e=5)
    assert store["d"] == 4 and store["e"] == 5
    assert store.pop("d") == 4 and "d" not in store
    store.clear()
    assert len(store) == 0


@pytest.mark.parametrize("fsync", [False, True])
def test_values_persist_across_reopen(opener, fsync):
    with opener(fsync=fsync) as store:
        store["k"] = {"nested": [1, 2.5, "three", b"four", None, (5,)]}
        store["empty"] = ""
    with opener("r") as store:
        assert store["k"] == {"nested": [1, 2.5, "three", b"four", None, (5,)]}
        assert store["empty"] == ""


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_protocols_keep_references(opener, protocol):
    shared = Config("shared")
    with opener(protocol=protocol) as store:
        store["shared"] = shared
        store["user"] = [shared, shared]
    with opener("r") as store:
        user = store["user"]
        assert user[0] is user[1] is store["shared"]


def test_non_str_key_raises_type_error_naming_the_type(store):
    for key in (1, b"bytes", None, ("t",)):
        with pytest.raises(TypeError, match=type(key).__name__):
            store[key] = 1
        with pytest.raises(TypeError, match=type(key).__name__):
            store[key]
        with pytest.raises(TypeError, match=type(key).__name__):
            del store[key]


def test_unpicklable_value_names_the_key_and_changes_nothing(opener):
    store = opener()
    store["k"] = "previous"
    with pytest.raises(engine.PicklingError, match="'k'"):
        store["k"] = Unpicklable()
    with pytest.raises(engine.PicklingError, match="'new'"):
        store["new"] = [Unpicklable()]
    assert store["k"] == "previous" and "new" not in store and len(store) == 1
    store.close()
    with opener("r") as again:
        assert dict(again.items()) == {"k": "previous"}


def test_read_only_store_refuses_writes_and_writes_nothing(opener, path):
    with opener() as store:
        store["k"] = {"v": 1}
        store["l"] = [1]
    directory = os.path.dirname(path)

    def snapshot():
        return {name: (os.stat(os.path.join(directory, name)).st_mtime_ns,
                       hashlib.sha256(open(os.path.join(directory, name), "rb").read()).digest())
                for name in sorted(os.listdir(directory))}
    before = snapshot()
    with opener("r") as store:
        assert store.read_only
        assert store["k"] == {"v": 1} and len(store) == 2 and "l" in store
        assert list(store.values()) == [{"v": 1}, [1]]
        for attempt in (lambda: store.__setitem__("k", 2), lambda: store.__delitem__("k"),
                        store.gc, store.transaction().__enter__, lambda: store.update(x=1)):
            with pytest.raises(ReadOnlyError):
                attempt()
        store.sync()
    assert snapshot() == before


@pytest.mark.parametrize("content", [os.urandom(2048), b"just some text\n" * 100])
def test_not_a_store_raises_format_error_naming_the_file(opener, path, content):
    with open(path, "wb") as file:
        file.write(content)
    for flag in "rwc":
        with pytest.raises(FormatError) as raised:
            opener(flag)
        assert path in str(raised.value)


def test_iteration_streams_in_batches_and_allows_writes(store):
    with store.transaction():
        for i in range(2500):
            store[f"k{i:04}"] = {"i": i}
    assert list(store) == [f"k{i:04}" for i in range(2500)]
    assert [value["i"] for value in store.values()] == list(range(2500))
    seen = 0
    for key, value in store.items():
        assert value == {"i": int(key[1:])}
        if seen % 2:
            del store[key]     # writing while iterating is allowed
        seen += 1
    assert seen == 2500 and len(store) == 1250


class FailsToLoad:
    """Its state cannot be set: loading its record raises ValueError."""

    def __init__(self):
        self.state = "any"

    def __setstate__(self, state):
        raise ValueError("this state cannot be set")


def test_iteration_yields_the_pairs_before_a_failing_record_then_raises(store):
    # Records are loaded a batch ahead of what is yielded (Store's ITEMS_AHEAD): the
    # failure must still come after the pairs before it, and name its key.
    with store.transaction():
        for i in range(300):
            store[f"k{i:03}"] = FailsToLoad() if i == 150 else i
    got = []
    with pytest.raises(ValueError, match="this state cannot be set") as raised:
        for key, value in store.items():
            got.append((key, value))
    assert got == [(f"k{i:03}", i) for i in range(150)]
    assert any("'k150'" in note for note in raised.value.__notes__)
    with pytest.raises(ValueError):
        sum(1 for _ in store.values(errors="skip"))     # skip is for missing classes only
    del store["k150"]
    assert [value for value in store.values()] == [i for i in range(300) if i != 150]


def test_missing_file(opener):
    for flag in "rw":
        with pytest.raises(FileNotFoundError):
            opener(flag)


def test_bad_arguments(path):
    with pytest.raises(ValueError, match="flag"):
        pstore.open(path, "x")
    with pytest.raises(ValueError, match="protocol"):
        pstore.open(path, protocol=6)
    with pytest.raises(ValueError, match="backend"):
        pstore.open(path, backend="nope")


def test_closed_store_raises_on_every_call(store):
    store["k"] = 1
    keys = iter(store)
    store.close()
    store.close()
    assert store.closed
    calls = [lambda: store["k"], lambda: store.__setitem__("k", 2), lambda: store.__delitem__("k"),
             lambda: "k" in store, lambda: len(store), lambda: list(store), lambda: next(keys),
             store.sync, store.gc, lambda: store.transaction().__enter__(),
             lambda: store.__enter__()]
    for call in calls:
        with pytest.raises(ClosedError, match="closed"):
            call()


def test_context_manager_commits_and_closes(opener):
    with opener() as store:
        store["k"] = 1
    assert store.closed
    with pytest.raises(RuntimeError):
        with opener() as store:
            store["j"] = 2
            raise RuntimeError
    assert store.closed
    with opener("r") as store:
        assert dict(store.items()) == {"k": 1, "j": 2}


def test_writeback(opener):
    with opener(writeback=True) as store:
        store["list"] = [1]
        store["list"].append(2)
        loaded = store["list"]
        loaded.append(3)
    with opener(writeback=True) as store:
        assert store["list"] == [1, 2, 3]
        store["list"].append(4)
        store.sync()
        store["list"].append(5)
    with opener() as store:
        assert store["list"] == [1, 2, 3, 4, 5]
        store["list"].append(6)     # writeback=False: not written
    with opener() as store:
        assert store["list"] == [1, 2, 3, 4, 5]


def test_writeback_is_dropped_on_exception(opener):
    with pytest.raises(KeyError):
        with opener(writeback=True) as store:
            store["list"] = [1]
            store["list"].append(2)
            raise KeyError
    with opener("r") as store:
        assert store["list"] == [1]


def test_threads_share_a_store(store):
    store["n"] = 0
    errors = []

    def work(name: str) -> None:
        try:
            for i in range(50):
                with store.transaction():
                    store["n"] = store["n"] + 1
                store[f"{name}-{i}"] = [name, i]
                assert store[f"{name}-{i}"] == [name, i]
        except BaseException as error:   # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store["n"] == 200 and len(store) == 201
