"""Repeated gets answered from memory while the change marker says nothing changed
(pstore/store/freshness.py: Freshness), and never a stale answer."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pstore


def test_a_repeated_get_reads_no_record_while_nothing_changed(counting_opener):
    with counting_opener() as store:
        store["k"] = {"n": 1}
    store = counting_opener("r")
    first = store["k"]
    reads, markers = store.counts["reads"], store.counts["markers"]
    for _ in range(5):
        assert store["k"] is first
    assert store.counts["reads"] == reads           # no key or record read again
    assert store.counts["markers"] == markers + 5   # but the marker, each time


def test_a_repeated_get_sees_another_stores_commit(opener):
    writer = opener()
    writer["k"] = {"n": 1}
    reader = opener()
    held = reader["k"]
    assert reader["k"] is held
    writer["k"] = {"n": 2}          # a new record bound to the key
    assert reader["k"] == {"n": 2}
    writer["other"] = 0             # the key itself unchanged: still the same object
    again = reader["k"]
    assert again == {"n": 2} and reader["k"] is again
    del writer["k"]
    assert "k" not in reader
    with pytest.raises(KeyError):
        reader["k"]


def test_a_repeated_get_sees_this_stores_own_writes(opener):
    store = opener()
    store["k"] = {"n": 1}
    held = store["k"]
    store["k"] = {"n": 2}
    assert store["k"] == {"n": 2} and store["k"] is not held
    with store.transaction():
        store["k"] = [3]
        assert store["k"] == [3]
    assert store["k"] == [3]
    with pytest.raises(RuntimeError), store.transaction():
        store["k"] = "rolled back"
        raise RuntimeError
    assert store["k"] == [3]
    del store["k"]
    assert "k" not in store


def test_a_repeated_get_sees_another_processs_commit(tmp_path):
    path = str(tmp_path / "s.db")
    with pstore.open(path) as store:
        store["k"] = {"n": 1}
    store = pstore.open(path)
    held = store["k"]
    assert store["k"] is held
    code = f"import pstore\nwith pstore.open({path!r}) as s: s['k'] = {{'n': 2}}"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert store["k"] == {"n": 2}
    store.close()
