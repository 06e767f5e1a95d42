"""The engine runs in two modes: with its C fast paths (pstore/engine/_pickler_speedups.c
for the pickler, pstore/engine/_speedups.c for the unpickler) and in pure Python. Modules
that use ``engine_mode`` run every test in both, switched by the one function that picks
the implementation, :func:`pstore.engine.use_accelerators`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pstore import engine


@pytest.fixture(scope="module", params=["c", "python"])
def engine_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "c" and not engine.use_accelerators(True):
        engine.use_accelerators()
        pytest.skip("pstore.engine's C extensions are not built")
    engine.use_accelerators(request.param == "c")
    try:
        yield request.param
    finally:
        engine.use_accelerators()
