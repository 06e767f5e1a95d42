"""The two layers of the backend contract (pstore/backends/base.py), its concrete
``writing()`` transaction, and how ``open_backend`` picks a class."""

from __future__ import annotations

import importlib
import shelve

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pstore
from pstore.backends import BACKENDS, READERS, Backend, ReadableBackend, open_backend
from pstore.backends.shelf import ShelveReader
from pstore.errors import ArgumentError, ReadOnlyError

from .conftest import fill

WRITE_METHODS = {"new_oid", "put_record", "delete_record", "is_referenced", "reaches",
                 "put_blob", "bind_key", "unbind_key", "begin", "commit", "rollback", "gc",
                 "collect_blobs", "key_lock", "vacuum", "writing", "reserve_ids", "set_meta"}


def test_the_writable_layer_is_apart_from_the_readable_one():
    assert not WRITE_METHODS & set(dir(ReadableBackend))
    assert WRITE_METHODS <= set(dir(Backend))
    read = set(ReadableBackend.__abstractmethods__)
    assert set(Backend.__abstractmethods__) - read <= WRITE_METHODS
    assert read <= set(Backend.__abstractmethods__)


def _class_of(target: str) -> type:
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def test_every_registered_backend_is_writable_and_every_reader_is_not():
    for target in BACKENDS.values():
        assert issubclass(_class_of(target), Backend)
    assert set(READERS) == {"shelve"}
    assert issubclass(ShelveReader, ReadableBackend)
    assert not issubclass(ShelveReader, Backend)
    assert not WRITE_METHODS & set(dir(ShelveReader))


def test_writing_commits_a_block_that_ends_normally(backend, opener):
    with backend.writing() as inside:
        assert inside is backend
        oid = backend.new_oid()
        backend.put_record(oid, b"data", ())
        backend.bind_key("k", oid)
    backend.close()
    reader = opener("r")
    assert reader.get_item("k") == (oid, b"data")


def test_writing_rolls_back_a_block_that_raises_and_releases_the_lock(opener):
    fill(opener())
    backend = opener("w")
    with pytest.raises(KeyError):
        with backend.writing():
            backend.bind_key("k2", backend.get_key("k"))
            backend.unbind_key("k")
            raise KeyError("abandon")
    assert backend.get_key("k") is not None and backend.get_key("k2") is None
    other = opener("w", lock_timeout=0.5)
    with other.writing():    # the lock was released: another connection takes it at once
        other.unbind_key("k")
    assert backend.get_key("k") is None


def test_writing_on_a_read_only_backend_raises_and_changes_nothing(opener):
    fill(opener())
    reader = opener("r")
    with pytest.raises(ReadOnlyError):
        with reader.writing():
            pytest.fail("the block ran")
    assert reader.get_key("k") is not None


def test_a_variant_only_for_a_backend_that_takes_one(path):
    with pytest.raises(ArgumentError, match="no variants") as caught:
        open_backend("sqlite:anything", path, "c", lock_timeout=1.0, fsync=False)
    assert caught.value.name == "backend" and caught.value.value == "sqlite:anything"
    with pytest.raises(ArgumentError, match="one of"):
        open_backend("nope", path, "c", lock_timeout=1.0, fsync=False)


def test_a_store_on_a_read_only_view_refuses_every_write_and_still_reads(tmp_path):
    source = str(tmp_path / "old.shelf")
    with shelve.open(source) as shelf:
        shelf["config"] = {"lr": 0.01}
    with pstore.open(source, "r", backend="shelve") as store:
        assert store.read_only
        for write in (lambda: store.__setitem__("k", 1), lambda: store.__delitem__("config"),
                      store.gc, lambda: store.transaction().__enter__(), store.clear):
            with pytest.raises(ReadOnlyError):
                write()
        assert dict(store.items()) == {"config": {"lr": 0.01}}


# -- ReadAhead: the rows of a snapshot fetched ahead in key order ----------------------------

class SortedKeys:
    """A fetch over sorted keys, as the backends' read-ahead query answers it, counting the
    rows it returns."""

    def __init__(self, keys):
        self.keys = sorted(keys)
        self.rows_sent = 0
        self.queries = 0

    def fetch(self, key, limit, before):
        self.queries += 1
        rows = [(k, i, b"d", 1) for i, k in enumerate(self.keys)
                if k >= key and (before is None or k < before)][:limit]
        self.rows_sent += len(rows)
        return rows


@given(bound=st.sets(st.text(alphabet="ab\0é", max_size=4), max_size=60),
       asked=st.lists(st.text(alphabet="ab\0é", max_size=4), max_size=120))
def test_read_ahead_answers_every_key_and_fetches_no_row_twice(bound, asked):
    from pstore.backends.base import ReadAhead

    table = SortedKeys(bound)
    ahead = ReadAhead(table.fetch, lambda oid: None)
    for key in asked + sorted(bound):
        row = ahead.row(key)
        assert (row is not None) == (key in bound), key
        if row is not None:
            assert row[0] == key
    assert table.rows_sent == len(bound)    # each row once, however the keys were asked

