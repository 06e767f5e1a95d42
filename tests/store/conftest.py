"""Fixtures of the store tests: every test runs once per backend in BACKENDS."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import pstore
from pstore.backends import BACKENDS


@pytest.fixture(params=sorted(BACKENDS))
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def path(tmp_path: os.PathLike) -> str:
    return os.path.join(tmp_path, "store.db")


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
