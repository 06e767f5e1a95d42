"""pstore.convert: real sqlitedict, diskcache, ZODB and shelve files, made here by those
libraries."""

from __future__ import annotations

import os
import shelve
import sqlite3
import time
from pathlib import Path

import pytest

import pstore
from pstore.migrate import DISKCACHE_EXPIRY_KEY, ConvertError, detect_kind

from .store.objects import Config

sqlitedict = pytest.importorskip("sqlitedict")
diskcache = pytest.importorskip("diskcache")


def stored(path: Path) -> dict:
    with pstore.open(path, "r") as store:
        return dict(store.items())


def test_sqlitedict_one_table(tmp_path: Path) -> None:
    source = tmp_path / "old.sqlite"
    with sqlitedict.SqliteDict(str(source)) as old:
        old["a"] = [1, 2, {"x": b"y"}]
        old["config"] = Config("cfg", size=3)
        old.commit()
    assert detect_kind(source) == "sqlitedict"
    report = pstore.convert(source, tmp_path / "new.db")
    assert (report.kind, report.copied) == ("sqlitedict", 2)
    assert stored(tmp_path / "new.db") == {"a": [1, 2, {"x": b"y"}],
                                           "config": Config("cfg", size=3)}


def test_sqlitedict_every_table_prefixed_or_one_chosen(tmp_path: Path) -> None:
    source = tmp_path / "old.sqlite"
    for table, value in [("users", 1), ("runs", 2)]:
        with sqlitedict.SqliteDict(str(source), tablename=table) as old:
            old["k"] = value
            old.commit()
    pstore.convert(source, tmp_path / "all.db")
    assert stored(tmp_path / "all.db") == {"users/k": 1, "runs/k": 2}
    pstore.convert(source, tmp_path / "one.db", table="runs")
    assert stored(tmp_path / "one.db") == {"k": 2}
    with pytest.raises(ConvertError, match="no sqlitedict table 'nope'.*users"):
        pstore.convert(source, tmp_path / "none.db", table="nope")


def make_diskcache(directory: Path) -> None:
    with diskcache.Cache(str(directory)) as cache:
        cache["text"] = "small"
        cache["number"] = 7
        cache["big bytes"] = b"b" * 100_000            # a value file, binary
        cache["big text"] = "t" * 100_000              # a value file, text
        cache["big list"] = list(range(30_000))        # a value file, pickled
        cache["dict"] = {"a": (1, 2)}
        cache["soon"] = "expires later"
        cache.set("soon", "expires later", expire=3600)
        cache.set("gone", "expired", expire=0.01)
        cache[("user", 1)] = "tuple key"
        cache[42] = "int key"
    time.sleep(0.05)


def test_diskcache_refuses_keys_that_are_not_str_with_a_list(tmp_path: Path) -> None:
    make_diskcache(tmp_path / "cache")
    with pytest.raises(ConvertError, match=r"2 keys are not str: .*\('user', 1\).*42.*keys='repr'"):
        pstore.convert(tmp_path / "cache", tmp_path / "new.db")
    assert not (tmp_path / "new.db").exists()      # refused before anything was written


def test_diskcache_with_repr_keys_copies_values_and_expiry(tmp_path: Path) -> None:
    make_diskcache(tmp_path / "cache")
    assert detect_kind(tmp_path / "cache") == "diskcache"
    report = pstore.convert(tmp_path / "cache", tmp_path / "new.db", keys="repr")
    assert (report.copied, report.expired) == (9, 1)
    values = stored(tmp_path / "new.db")
    expiry = values.pop(DISKCACHE_EXPIRY_KEY)
    assert values == {"text": "small", "number": 7, "big bytes": b"b" * 100_000,
                      "big text": "t" * 100_000, "big list": list(range(30_000)),
                      "dict": {"a": (1, 2)}, "soon": "expires later",
                      "('user', 1)": "tuple key", "42": "int key"}
    assert list(expiry) == ["soon"] and expiry["soon"] > time.time() + 3000


def test_diskcache_value_file_outside_the_cache_is_refused(tmp_path: Path) -> None:
    make_diskcache(tmp_path / "cache")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the store")
    with sqlite3.connect(tmp_path / "cache" / "cache.db") as db:
        db.execute("UPDATE Cache SET filename = '../secret.txt' WHERE key = 'big text'")
    with pytest.raises(ConvertError, match="names the file '../secret.txt'.*not inside"):
        pstore.convert(tmp_path / "cache", tmp_path / "new.db", keys="repr")
    os.symlink(secret, tmp_path / "cache" / "link.val")
    with sqlite3.connect(tmp_path / "cache" / "cache.db") as db:
        db.execute("UPDATE Cache SET filename = 'link.val' WHERE key = 'big text'")
    with pytest.raises(ConvertError, match="cannot read the value file 'link.val'"):
        pstore.convert(tmp_path / "cache", tmp_path / "new2.db", keys="repr")


def test_zodb_root_with_btrees_persistent_mappings_and_shared_objects(tmp_path: Path) -> None:
    ZODB = pytest.importorskip("ZODB")
    import transaction
    from BTrees.OOBTree import OOBTree, OOTreeSet
    from persistent.list import PersistentList
    from persistent.mapping import PersistentMapping

    source = tmp_path / "Data.fs"
    db = ZODB.DB(str(source))
    try:
        with db.transaction() as connection:
            root = connection.root()
            shared = PersistentMapping(name="shared")
            small, big = OOBTree(), OOBTree()
            small.update({"a": 1, "b": [2]})
            big.update({f"k{i:05}": {"i": i, "shared": shared} for i in range(3000)})
            names = OOTreeSet()
            names.update([f"n{i}" for i in range(500)])
            root["small"], root["big"], root["names"] = small, big, names
            root["shared"] = shared
            root["list"] = PersistentList([1, shared])
            root["config"] = Config("zodb", size=1)
        transaction.abort()
    finally:
        db.close()
    assert detect_kind(source) == "zodb"
    report = pstore.convert(source, tmp_path / "new.db")
    assert report.copied == 6
    with pstore.open(tmp_path / "new.db", "r") as store:
        assert store["small"] == {"a": 1, "b": [2]}
        big = store["big"]
        assert len(big) == 3000 and big["k00042"]["i"] == 42
        assert store["names"] == {f"n{i}" for i in range(500)}
        assert isinstance(store["shared"], pstore.PersistentDict)
        assert dict(store["shared"]) == {"name": "shared"}
        assert big["k00000"]["shared"] is big["k02999"]["shared"] is store["shared"]
        assert store["list"][1] is store["shared"]
        assert store["config"] == Config("zodb", size=1)


def test_zodb_tuple_keys_follow_the_key_rule(tmp_path: Path) -> None:
    ZODB = pytest.importorskip("ZODB")

    source = tmp_path / "Data.fs"
    db = ZODB.DB(str(source))
    try:
        with db.transaction() as connection:
            connection.root()[("t", 1)] = "tuple"
            connection.root()["s"] = "str"
    finally:
        db.close()
    with pytest.raises(ConvertError, match=r"1 keys are not str: \('t', 1\)"):
        pstore.convert(source, tmp_path / "new.db")
    pstore.convert(source, tmp_path / "new.db", keys="repr")
    assert stored(tmp_path / "new.db") == {"('t', 1)": "tuple", "s": "str"}


def test_shelve_and_unknown_sources(tmp_path: Path) -> None:
    with shelve.open(str(tmp_path / "old")) as shelf:
        shelf["a"] = [1]
    assert detect_kind(tmp_path / "old") == "shelve"
    assert pstore.convert(tmp_path / "old", tmp_path / "new.db").copied == 1
    assert pstore.convert_shelve(tmp_path / "old", tmp_path / "new2.db") == 1
    assert stored(tmp_path / "new.db") == {"a": [1]}
    (tmp_path / "junk").write_bytes(b"nothing known")
    with pytest.raises(ConvertError, match="'.*junk': not a source pstore can convert"):
        pstore.convert(tmp_path / "junk", tmp_path / "x.db")
    with pytest.raises(ConvertError, match="an SQLite database without sqlitedict's tables"):
        pstore.convert(tmp_path / "new.db", tmp_path / "x.db")


# -- pstore.copy: record by record, any backend to any backend ------------------------------

def make_graph(location: str, backend: str | None) -> None:
    """Shared objects across keys, Persistent objects, equal arrays (one blob)."""
    np = pytest.importorskip("numpy")
    with pstore.open(location, "c", backend=backend) as store, store.transaction():
        shared = {"lr": 0.1}
        child = pstore.PersistentList([1, 2])
        store["a"] = {"config": shared, "weights": np.arange(50_000), "child": child}
        store["b"] = [shared, np.arange(50_000)]
        store["child"] = child
        store["config"] = shared


def check_graph(location: str, backend: str | None = None) -> None:
    np = pytest.importorskip("numpy")
    with pstore.open(location, "r", backend=backend) as store:
        assert sorted(store) == ["a", "b", "child", "config"]
        a, b = store["a"], store["b"]
        assert a["config"] is b[0] is store["config"] and a["config"] == {"lr": 0.1}
        assert a["child"] is store["child"] and isinstance(a["child"], pstore.PersistentList)
        assert list(a["child"]) == [1, 2]
        assert np.array_equal(a["weights"], np.arange(50_000))
        assert np.array_equal(b[1], np.arange(50_000))
        if location.startswith("postgresql:"):  # (no statistics there yet)
            assert len(store._backend.blob_names()) == 1
        else:
            report = store.verify()
            assert report.ok, report.problems
            assert store.info().blobs == 1     # the two equal arrays: one blob
    with pstore.open(location, "w", backend=backend) as store:
        # New objects get new ids, never a copied one.
        store["child"].append(3)
        store["new"] = {"fresh": [1]}
    with pstore.open(location, "r", backend=backend) as store:
        assert store["a"]["child"] is store["child"]
        assert list(store["child"]) == [1, 2, 3] and store["new"] == {"fresh": [1]}
        assert store["a"]["config"] is store["b"][0] is store["config"]


def test_copy_sqlite_to_dbm_to_sqlite_keeps_identity_persistence_and_blobs(tmp_path: Path) -> None:
    first, second, third = (str(tmp_path / name) for name in ("a.db", "b.dbm", "c.db"))
    make_graph(first, "sqlite")
    counted: list[int] = []
    assert pstore.copy(first, second, backend="dbm", progress=counted.append) == 4
    with pstore.open(first, "r") as store:
        assert sum(counted) == store.info().records and set(counted) == {1}
    assert pstore.copy(second, third) == 4
    for location in (second, third):
        check_graph(location)


def test_copy_imports_nothing_of_the_source(tmp_path: Path) -> None:
    """Records are copied as bytes: no class is looked up while copying (an audit hook
    in a fresh process), and one is as soon as the copy is loaded."""
    import subprocess
    import sys

    source, target = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    with pstore.open(source) as store:
        store["config"] = Config("cfg", size=1)
    script = f"""
import sys, pstore
looked_up = []
sys.addaudithook(lambda event, args:
                 looked_up.append(args) if event == "pickle.find_class" else None)
pstore.copy({source!r}, {target!r})
print(len(looked_up))
with pstore.open({target!r}, "r") as store:
    store["config"]
print(len(looked_up))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=60, check=True)
    assert done.stdout.split() == ["0", "1"]


def test_copy_to_and_from_postgresql(tmp_path: Path, pg_server) -> None:
    url = pg_server.location()
    first, back = str(tmp_path / "a.db"), str(tmp_path / "back.dbm")
    make_graph(first, "sqlite")
    assert pstore.copy(first, url) == 4
    assert pstore.copy(url, back, backend="dbm") == 4
    check_graph(url)
    check_graph(back)


def test_copy_refuses_a_target_that_is_not_empty_and_changes_nothing(tmp_path: Path) -> None:
    source, target = str(tmp_path / "a.db"), str(tmp_path / "b.dbm")
    make_graph(source, "sqlite")
    with pstore.open(target, backend="dbm") as store:
        store["mine"] = [1]
    with pytest.raises(pstore.migrate.CopyError, match="not empty.*1 keys.*flag 'n'") as caught:
        pstore.copy(source, target)
    assert isinstance(caught.value, ValueError) and caught.value.target == target
    with pstore.open(target, "r") as store:
        assert dict(store.items()) == {"mine": [1]}
    with pytest.raises(pstore.migrate.CopyError, match="the same store"):
        pstore.copy(source, source, flag="n")
    assert pstore.copy(source, target, flag="n") == 4
    check_graph(target)


def test_copy_of_a_damaged_record_names_it_and_writes_nothing(tmp_path: Path) -> None:
    source, target = str(tmp_path / "a.db"), str(tmp_path / "b.db")
    with pstore.open(source) as store:
        store["k"] = "value " * 100
    with sqlite3.connect(source) as db:
        (data,) = db.execute("SELECT data FROM records WHERE oid = 1").fetchone()
        damaged = data[:40] + bytes([data[40] ^ 1]) + data[41:]
        db.execute("UPDATE records SET data = ? WHERE oid = 1", (damaged,))
    with pytest.raises(pstore.CorruptionError, match="object id 1"):
        pstore.copy(source, target)
    with pstore.open(target, "r") as store:
        assert len(store) == 0 and store.info().records == 0


def test_copy_of_a_store_from_before_digests_gives_every_record_one(tmp_path: Path) -> None:
    from tests.backends.test_backend_sqlite import _VERSION_1

    source, target = str(tmp_path / "old.db"), str(tmp_path / "new.dbm")
    with sqlite3.connect(source) as db:
        for statement in _VERSION_1:
            db.execute(statement)
    before = Path(source).read_bytes()
    assert pstore.copy(source, target, backend="dbm") == 2
    assert Path(source).read_bytes() == before     # read only: still version 1
    with pstore.open(target, "r") as store:
        assert store["user"] == {"shared": [1, 2]}
        assert store["user"]["shared"] is store["shared"]
        report = store.verify()
        assert report.ok and "0 without digest" in str(report)
