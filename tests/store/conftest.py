"""Fixtures of the store tests: every test runs once per backend in BACKENDS."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator

import pytest

import pstore
from pstore.backends import BACKENDS
from tests.pg import skip_local_file_tests

#: Tests about the files of a store (PostgreSQL's equivalents: tests/backends).
_COUNTS_BLOB_FILES = "counts or reads the blob files under PATH.blobs"
LOCAL_FILE_TESTS = {
    **dict.fromkeys([
        "test_every_dtype_round_trips_through_a_blob", "test_object_dtype_arrays_go_in_band",
        "test_pandas_frames_and_series_round_trip",
        "test_bytes_in_band_and_picklebuffers_out_of_band",
        "test_equal_arrays_under_many_keys_are_stored_once",
        "test_gc_removes_the_blobs_no_record_uses",
        "test_a_rolled_back_transaction_leaves_no_blob",
        "test_an_unpicklable_value_leaves_no_blob_and_the_old_value",
        "test_a_failed_blob_flush_fails_the_commit_and_leaves_the_store_as_it_was",
        "test_compressed_records_and_blobs",
        "test_a_corrupt_or_missing_blob_names_the_record_and_the_blob",
        "test_a_persistent_objects_arrays_are_blobs_loaded_with_its_state",
        "test_killed_array_writer_never_leaves_a_dangling_or_partial_blob"],
        _COUNTS_BLOB_FILES),
    "test_loading_reads_no_page_of_an_array_until_it_is_touched":
        "blobs are read into memory, not mapped from a file",
    "test_read_only_store_refuses_writes_and_writes_nothing": "snapshots the store's files",
    "test_not_a_store_raises_format_error_naming_the_file": "writes a file that is not a store",
    **dict.fromkeys([
        "test_a_symlinked_fan_out_folder_is_neither_followed_nor_emptied",
        "test_a_fan_out_folder_replaced_by_a_link_is_refused_at_load_and_write",
        "test_a_symlinked_blob_folder_is_refused_and_left_alone",
        "test_a_folder_where_a_blob_file_belongs_is_reported_not_an_isadirectoryerror",
        "test_a_blob_file_replaced_by_a_symlink_is_refused_at_load",
        "test_a_stray_temporary_symlink_is_left_alone",
        "test_odd_names_and_files_are_skipped_and_listed",
        "test_a_dangling_link_as_the_blob_folder_creates_nothing_at_its_target"],
        "plants links and files in the blob folder PATH.blobs"),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def path(tmp_path: os.PathLike, request: pytest.FixtureRequest) -> str:
    """A new store's location: a file in the test's folder, or a fresh store on the
    session's PostgreSQL server."""
    if ("backend_name" in request.fixturenames
            and request.getfixturevalue("backend_name") == "postgresql"):
        return request.getfixturevalue("pg_server").location()
    return os.path.join(tmp_path, "store.db")


@pytest.fixture(autouse=True)
def _skip_local_file_tests(request: pytest.FixtureRequest) -> None:
    skip_local_file_tests(request, LOCAL_FILE_TESTS)


@pytest.fixture
def opener(backend_name: str, path: str) -> Iterator:
    """open(flag="c", **options) -> a Store on `path` with the test's backend, closed after."""
    opened: list[pstore.Store] = []

    def open_(flag: str = "c", **options) -> pstore.Store:
        options.setdefault("lock_timeout", 10.0)
        store = pstore.open(path, flag, backend=backend_name, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(opener) -> pstore.Store:
    return opener()


@pytest.fixture
def counting_opener(backend_name: str, path: str) -> Iterator:
    """open(flag="c", **store_options) -> a Store whose backend counts what it reads and writes.

    ``store.counts`` (the backend's) has "reads" (records read: get_record, get_item,
    each row of iter_items), "writes" (records written by put_record or put_records),
    "markers" (change_marker calls) and "blob_puts" (put_blob calls). A real backend of
    the test's kind underneath: the subclass only counts.
    """
    module_name, class_name = BACKENDS[backend_name].split(":")
    real = getattr(importlib.import_module(module_name), class_name)

    class Counting(real):
        def __init__(self, *args, **kwargs) -> None:
            self.counts = {"reads": 0, "writes": 0, "markers": 0, "blob_puts": 0}
            super().__init__(*args, **kwargs)

        def get_record(self, oid):
            self.counts["reads"] += 1
            return super().get_record(oid)

        def get_item(self, key):
            self.counts["reads"] += 1
            return super().get_item(key)

        def iter_items(self):
            for row in super().iter_items():
                self.counts["reads"] += 1
                yield row

        def change_marker(self):
            self.counts["markers"] += 1
            return super().change_marker()

        def put_record(self, *args, **kwargs):
            if not self.batching:   # put_records counted it already
                self.counts["writes"] += 1
            return super().put_record(*args, **kwargs)

        batching = False

        def put_records(self, records):
            records = list(records)
            self.counts["writes"] += len(records)
            self.batching = True
            try:
                return super().put_records(records)
            finally:
                self.batching = False

        def put_blob(self, chunks):
            self.counts["blob_puts"] += 1
            return super().put_blob(chunks)

    opened: list[pstore.Store] = []

    def open_(flag: str = "c", *, protocol: int = 5, writeback: bool = False) -> pstore.Store:
        backend = Counting(path, flag, lock_timeout=10.0, fsync=False)
        store = pstore.Store(backend, protocol=protocol, writeback=writeback)
        store.counts = backend.counts
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()
