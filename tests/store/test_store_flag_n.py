"""Flag 'n' under the write lock (issue 11 item 1): it empties a live store in one
transaction instead of deleting its files, with real processes holding it open.

SQLite only here; the DBM backend gains the same behaviour on its own branch (add it to
BACKENDS then)."""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import threading

import numpy as np
import pytest

import pstore
from pstore.backends.blobs import BlobStore

from . import store_workers

spawn = multiprocessing.get_context("spawn")
BACKENDS = ["sqlite"]
ARRAY = np.arange(20_000, dtype=np.int64)


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


def filled(path: str, backend_name: str) -> dict[str, object]:
    contents = {f"k{index}": [index, "x" * index] for index in range(20)}
    with pstore.open(path, "c", backend=backend_name) as store:
        store.update(contents)
        store["array"] = ARRAY
    return contents


def keep_open_and_write_later(backend: str, path: str, ready, go, results) -> None:
    """Hold a Store open across another process's 'n'; report what it sees, then write."""
    with pstore.open(path, "w", backend=backend) as store:
        results.put(sorted(store.keys()))
        ready.set()
        go.wait(60)
        results.put(sorted(store.keys()))
        store["late"] = {"written": "after 'n'"}
        store["late array"] = ARRAY + 1


def test_n_while_another_process_is_in_a_transaction_times_out_and_changes_nothing(
        path, backend_name):
    contents = filled(path, backend_name)
    holding, release = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=store_workers.hold_transaction,
                           args=(backend_name, path, holding, release))
    holder.start()
    try:
        assert holding.wait(60)
        size = os.path.getsize(path)
        with pytest.raises(pstore.LockTimeoutError) as raised:
            pstore.open(path, "n", backend=backend_name, lock_timeout=0.3)
        assert raised.value.path == path
        assert os.path.getsize(path) == size
    finally:
        release.set()
        holder.join(60)
    assert holder.exitcode == 0     # its commit went through
    with pstore.open(path, "r", backend=backend_name) as store:
        assert {key: store[key] for key in contents} == contents
        assert store["held"] is True and np.array_equal(store["array"], ARRAY)


def test_n_waits_for_a_transaction_and_empties_the_store_after_its_commit(path, backend_name):
    filled(path, backend_name)
    holding, release = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=store_workers.hold_transaction,
                           args=(backend_name, path, holding, release))
    holder.start()
    try:
        assert holding.wait(60)
        # The holder commits while this process waits for the lock: 'n' comes after it.
        threading.Timer(0.3, release.set).start()
        with pstore.open(path, "n", backend=backend_name, lock_timeout=60) as store:
            assert len(store) == 0
            store["fresh"] = 1
    finally:
        release.set()
        holder.join(60)
    assert holder.exitcode == 0
    with pstore.open(path, "r", backend=backend_name) as store:
        assert dict(store) == {"fresh": 1}
    assert list(BlobStore(path + ".blobs").names()) == []     # the old array's blob went too


def test_a_store_open_elsewhere_sees_the_emptied_store_and_its_writes_are_kept(
        path, backend_name):
    contents = filled(path, backend_name)
    ready, go, results = spawn.Event(), spawn.Event(), spawn.Queue()
    writer = spawn.Process(target=keep_open_and_write_later,
                           args=(backend_name, path, ready, go, results))
    writer.start()
    try:
        assert ready.wait(60)
        assert results.get(timeout=60) == sorted([*contents, "array"])
        with pstore.open(path, "n", backend=backend_name) as store:
            assert len(store) == 0
    finally:
        go.set()
        seen_after = results.get(timeout=60)
        writer.join(60)
    assert writer.exitcode == 0
    assert seen_after == []     # its next read saw the empty store
    with pstore.open(path, "r", backend=backend_name) as store:
        assert sorted(store) == ["late", "late array"]
        assert store["late"] == {"written": "after 'n'"}
        assert np.array_equal(store["late array"], ARRAY + 1)


def test_n_on_a_missing_path_creates_a_store(path, backend_name):
    with pstore.open(path, "n", backend=backend_name) as store:
        store["k"] = 1
    with pstore.open(path, "n", backend=backend_name) as store:
        assert len(store) == 0
        store["k"] = 2
    with pstore.open(path, "r", backend=backend_name) as store:
        assert store["k"] == 2


def test_paths_may_be_str_bytes_or_pathlike(tmp_path, backend_name):
    for index, path in enumerate([str(tmp_path / "a.db"), os.fsencode(tmp_path / "b.db"),
                                  pathlib.Path(tmp_path / "c.db")]):
        with pstore.open(path, "c", backend=backend_name) as store:
            store["index"] = index
            assert store.path == os.fsdecode(path)
        with pstore.open(path, "r", backend=backend_name) as store:
            assert store["index"] == index
