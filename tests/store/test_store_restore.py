"""Re-storing mapped arrays (s["copy"] = s["ds"]) refers to the blobs the store has: no
hashing, no copy, no new bytes."""

from __future__ import annotations

import gc

import pytest

np = pytest.importorskip("numpy")


def dataset() -> dict:
    rng = np.random.default_rng(7)
    return {"train": rng.standard_normal((512, 256)), "labels": np.arange(100_000)}


def test_a_mapped_dataset_restored_under_another_key_writes_no_blob(counting_opener):
    store = counting_opener()
    store["ds"] = dataset()
    assert store.counts["blob_puts"] == 2
    store.close()
    store = counting_opener("w")
    loaded = store["ds"]
    store["copy"] = loaded
    store["nested"] = {"again": loaded["train"], "other": [loaded["labels"]]}
    assert store.counts["blob_puts"] == 0           # referenced: no hashing, copy or new bytes
    store.close()
    reader = counting_opener("r")
    for key in ("ds", "copy"):
        value = reader[key]
        assert (value["train"] == dataset()["train"]).all()
        assert (value["labels"] == np.arange(100_000)).all()
    assert (reader["nested"]["again"] == dataset()["train"]).all()


def test_a_slice_or_a_changed_copy_of_a_mapped_array_is_a_new_blob(counting_opener):
    store = counting_opener()
    store["ds"] = dataset()
    store.close()
    store = counting_opener("w")
    loaded = store["ds"]
    store["half"] = loaded["labels"][: 50_000]       # a view of part of the mapping
    changed = loaded["train"].copy()
    changed[0, 0] = 42.0
    store["changed"] = changed
    assert store.counts["blob_puts"] == 2
    assert store["half"].tolist() == list(range(50_000))
    assert store["changed"][0, 0] == 42.0


def test_a_blob_collected_meanwhile_is_written_again(counting_opener):
    store = counting_opener()
    store["ds"] = dataset()
    store.close()
    store = counting_opener("w")
    loaded = store["ds"]
    del store["ds"]
    store.gc()                                       # the blobs are gone from the store
    store["back"] = loaded                           # still mapped in this process
    assert store.counts["blob_puts"] == 2
    del loaded
    gc.collect()
    assert (store["back"]["labels"] == np.arange(100_000)).all()
