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
