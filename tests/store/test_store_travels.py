"""A Store sent to another process (spawn pools, multiprocessing) arrives reopened."""

from __future__ import annotations

import multiprocessing
import pickle

import pytest

import pstore

from . import compute_workers


@pytest.mark.slow
def test_a_store_sent_to_a_spawn_pool_works_in_the_worker(opener):
    store = opener("n", lock_timeout=7.5)
    store["data"] = {"rows": [1, 2, 3]}
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(compute_workers.read_key_of_a_sent_store,
                               [(store, "data")] * 2)
    assert results == [{"rows": [1, 2, 3]}] * 2
    assert isinstance(store["data/seen"], int)      # the worker wrote through its own Store


def test_a_store_pickles_as_a_reopening_with_its_options(opener, path):
    store = opener("n", lock_timeout=7.5, protocol=4)
    store["k"] = 1
    copy = pickle.loads(pickle.dumps(store))
    try:
        assert copy is not store and copy.path == store.path and copy["k"] == 1
        assert copy.reopen_arguments[1] == "w"      # 'n' does not empty it again
        assert copy.reopen_arguments[2]["lock_timeout"] == 7.5
        assert copy.reopen_arguments[2]["protocol"] == 4
    finally:
        copy.close()
    store.close()
    reader = opener("r")
    again = pickle.loads(pickle.dumps(reader))
    try:
        assert again.read_only
    finally:
        again.close()


def test_a_store_in_a_transaction_or_closed_does_not_pickle(opener):
    store = opener()
    with store.transaction():
        with pytest.raises(TypeError, match="inside a transaction"):
            pickle.dumps(store)
    store.close()
    with pytest.raises(pstore.ClosedError):
        pickle.dumps(store)
