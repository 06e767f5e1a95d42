"""The ``pstore`` command, run as a real process."""

from __future__ import annotations

import shelve
import subprocess
import sys
from pathlib import Path

import pstore
from pstore import engine


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "pstore", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_demo_stores_and_reloads_a_graph_in_another_process(tmp_path: Path) -> None:
    out = run("demo", str(tmp_path / "demo.db"), cwd=tmp_path)
    assert "share one config object: True" in out
    assert out.rstrip().endswith("demo ok")


def test_dis_and_globals_read_without_running(tmp_path: Path) -> None:
    import collections
    (tmp_path / "x.pickle").write_bytes(engine.dumps(collections.OrderedDict(a=1), 2))
    assert "GLOBAL" in run("dis", "x.pickle", cwd=tmp_path)
    assert run("globals", "x.pickle", cwd=tmp_path).split() == ["collections.OrderedDict"]


def test_convert_shelve_keys_and_gc(tmp_path: Path) -> None:
    with shelve.open(str(tmp_path / "old")) as shelf:
        shelf["a"] = [1, 2]
        shelf["b"] = {"x": "y"}
    assert "copied 2 keys" in run("convert-shelve", "old", "new.db", cwd=tmp_path)
    assert run("keys", "new.db", cwd=tmp_path).split() == ["a", "b"]
    with pstore.open(tmp_path / "new.db", "r") as store:
        assert store["a"] == [1, 2] and store["b"] == {"x": "y"}
    assert "deleted 0" in run("gc", "new.db", cwd=tmp_path)
