"""The unpickler runs in two modes: with its C fast path (pstore/engine/_speedups.c)
and in pure Python. Modules that use ``unpickler_mode`` run every test in both."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pstore.engine import unpickler


@pytest.fixture(scope="module", params=["c", "python"])
def unpickler_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "c" and unpickler._speedups is None:
        pytest.skip("pstore.engine._speedups is not built")
    saved = unpickler._accelerate
    unpickler._accelerate = unpickler._speedups.run if request.param == "c" else None
    try:
        yield request.param
    finally:
        unpickler._accelerate = saved
