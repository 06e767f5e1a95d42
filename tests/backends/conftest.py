"""Fixtures of the backend contract tests: every test runs once per backend in BACKENDS
(and once more per other dbm module this Python has)."""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Iterator

import pytest

from pstore.backends import BACKENDS, Backend, open_backend
from pstore.backends.dbm import MODULES
from tests.pg import skip_local_file_tests


def available_dbm_modules() -> list[str]:
    """The dbm modules this Python has, best first (the first is what backend="dbm" uses)."""
    found = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        found.append(name)
    return found


#: Tests about the files of a store (PostgreSQL's equivalents: test_backend_postgresql.py).
LOCAL_FILE_TESTS = {
    "test_blobs_are_named_by_content_and_stored_once": "counts blob files",
    "test_a_rolled_back_blob_leaves_nothing": "counts blob files",
    "test_a_missing_or_wrong_sized_blob_is_a_format_error": "deletes a blob file",
    "test_gc_deletes_the_blobs_no_live_record_names": "counts blob files",
}


# Every backend, and the DBM backend on each other dbm module this Python has too.
@pytest.fixture(params=sorted(BACKENDS) + [f"dbm:{name}" for name in available_dbm_modules()[1:]])
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
    """open(flag="c", **options) -> a Backend on `path`, closed after the test."""
    opened: list[Backend] = []

    def open_(flag: str = "c", *, lock_timeout: float = 10.0, fsync: bool = False) -> Backend:
        backend = open_backend(backend_name, path, flag, lock_timeout=lock_timeout, fsync=fsync)
        opened.append(backend)
        return backend

    yield open_
    for backend in opened:
        backend.close()


@pytest.fixture
def backend(opener) -> Backend:
    return opener()


def fill(backend: Backend) -> None:
    """Bind "k" to one record holding b"data", commit, and close the backend."""
    backend.begin()
    oid = backend.new_oid()
    backend.put_record(oid, b"data", ())
    backend.bind_key("k", oid)
    backend.commit()
    backend.close()


def snapshot(directory: str, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, str]]:
    """name -> (mtime_ns, digest) of every file in the directory but names ending in ``skip``."""
    result = {}
    for name in sorted(os.listdir(directory)):
        if skip and name.endswith(skip):
            continue
        full = os.path.join(directory, name)
        with open(full, "rb") as file:
            result[name] = (os.stat(full).st_mtime_ns, hashlib.sha256(file.read()).hexdigest())
    return result
