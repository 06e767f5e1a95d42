"""benchmarks/engine.py runs, and pstore pickles its corpus exactly as the stdlib does.

No timing is checked: a benchmark's numbers are for people to read.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pstore import engine

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "engine.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_engine", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(bench: ModuleType) -> dict[str, Any]:
    return bench.build_corpus(quick=True)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pstore_pickles_the_corpus_like_the_stdlib(corpus: dict[str, Any], protocol: int) -> None:
    for name, value in corpus.items():
        data = engine.dumps(value, protocol)
        assert data == pickle.dumps(value, protocol), name
        assert engine.loads(data) == value, name


def test_every_implementation_round_trips(bench: ModuleType, corpus: dict[str, Any]) -> None:
    for impl in bench.IMPLEMENTATIONS:
        for name, value in corpus.items():
            assert impl.loads(impl.dumps(value, 5)) == value, (impl.name, name)


def test_one_quick_round_prints_a_table(bench: ModuleType,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--quick", "--repeat", "1", "--protocol", "4"]) == 0
    output = capsys.readouterr().out
    for name in ("nested", "records", "payload", "pstore", "pure-python", "target:"):
        assert name in output
    rows = [line for line in output.splitlines() if line.split()[:1] in (["nested"],
                                                                         ["records"],
                                                                         ["payload"])]
    assert len(rows) == 6
