"""Store.snapshot(): reads of one committed state, on every backend
(backends/base.py: begin_read, end_read, ReadAhead)."""

from __future__ import annotations

import pytest

import pstore
from pstore.backends.base import READ_AHEAD_RECORD_MAX, READ_AHEAD_ROWS


def test_a_snapshot_sees_the_state_at_its_start_and_no_later_commit(opener, backend_name):
    if backend_name == "dbm":
        pytest.skip("DBM's snapshot holds the write lock: the commit waits (next test)")
    writer = opener()
    writer.update({f"k{i:04d}": i for i in range(2000)})
    reader = opener()
    with reader.snapshot():
        assert reader["k0001"] == 1
        writer.update({"k0001": -1, "k1999": -1, "new": 0})
        del writer["k0500"]
        assert reader["k0001"] == 1 and reader["k1999"] == 1999 and reader["k0500"] == 500
        assert "new" not in reader and "k0500" in reader
        assert len(reader) == 2000
        assert dict(reader.items())["k0001"] == 1
    assert reader["k0001"] == -1 and reader["new"] == 0 and "k0500" not in reader
    assert len(reader) == 2000


def test_on_dbm_another_stores_write_waits_for_the_snapshot(opener, backend_name):
    if backend_name != "dbm":
        pytest.skip("only DBM's snapshot holds the write lock")
    reader = opener()
    reader["k"] = 1
    writer = opener(lock_timeout=0.2)
    with reader.snapshot():
        with pytest.raises(pstore.LockTimeoutError):
            writer["k"] = 2
        assert reader["k"] == 1
    writer["k"] = 2
    assert reader["k"] == 2


def test_gets_in_a_snapshot_give_what_plain_gets_give(opener):
    store = opener()
    shared = {"shared": True}
    store["shared"] = shared    # a record: the values below refer to it
    big = b"x" * (READ_AHEAD_RECORD_MAX + 1)
    values = {f"k{i:05d}": {"i": i, "shared": shared} for i in range(0, 3 * READ_AHEAD_ROWS, 2)}
    values["big"] = {"data": big}
    store.update(values)
    store.close()
    store = opener()
    values["shared"] = shared
    wanted = sorted(values) + [f"k{i:05d}" for i in range(1, 3 * READ_AHEAD_ROWS, 2)]
    wanted = wanted[::-3] + wanted[1::3] + wanted[2::3]     # an order other than the keys'
    with store.snapshot():
        for key in wanted:
            if key in values:
                assert store[key] == values[key], key
            else:
                with pytest.raises(KeyError):
                    store[key]
                assert key not in store
        assert store["k00000"]["shared"] is store["k00002"]["shared"]
        assert store["big"]["data"] == big


def test_writes_in_a_snapshot_raise_and_change_nothing(store):
    store["k"] = 1
    with store.snapshot():
        for write in (lambda: store.__setitem__("k", 2), lambda: store.__delitem__("k"),
                      lambda: store.update(k=3), store.gc):
            with pytest.raises(pstore.InTransactionError, match="inside a snapshot"):
                write()
        with pytest.raises(pstore.InTransactionError, match="start a transaction"):
            with store.transaction():
                pass
        assert store["k"] == 1
    assert store["k"] == 1
    store["k"] = 4      # writable again after the block
    assert store["k"] == 4


def test_nested_snapshots_join_and_a_snapshot_in_a_transaction_is_the_transaction(store):
    store["k"] = 1
    with store.snapshot():
        with store.snapshot():
            assert store["k"] == 1
        with pytest.raises(pstore.InTransactionError):
            store["k"] = 2      # still the outer snapshot
    with store.transaction():
        with store.snapshot():
            store["k"] = 5      # the transaction's
            assert store["k"] == 5
    assert store["k"] == 5


def test_a_store_closed_in_a_snapshot_ends_it(opener):
    store = opener()
    store["k"] = 1
    with store.snapshot():
        assert store["k"] == 1
        store.close()
        with pytest.raises(pstore.ClosedError):
            store["k"]
    assert store.closed
    again = opener()
    again["k"] = 2      # no lock or transaction left behind
    assert again["k"] == 2


def test_an_error_in_a_snapshot_ends_it(opener):
    store = opener()
    store["k"] = 1
    with pytest.raises(ZeroDivisionError):
        with store.snapshot():
            1 / 0
    other = opener()
    other["k"] = 2
    assert store["k"] == 2
