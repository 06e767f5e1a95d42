"""The benchmarks run: engine.py (and pstore pickles its corpus exactly as the stdlib
does), and arrays.py on a small dataset (and every library loads the same data).

No timing is checked: a benchmark's numbers are for people to read.
"""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys
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


def test_arrays_benchmark_runs_every_installed_library_on_the_same_data() -> None:
    script = BENCHMARK.parent / "arrays.py"
    # It exits with an error if two libraries loaded different data.
    output = subprocess.run([sys.executable, str(script), "--size-mb", "8"], check=True,
                            capture_output=True, text=True).stdout
    rows = {line.split()[0] for line in output.splitlines()[3:] if line.strip()}
    assert {"pstore", "pickle", "np.save"} <= rows
    assert "time to first element" in output and "peak RSS while writing" in output
