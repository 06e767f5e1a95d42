"""zstd compression of records and blobs (issue 15): round trips on every backend, and
the error that names what to install when the interpreter has no zstd (a real process
whose imports of zstandard and compression.zstd are blocked)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pstore
from pstore.backends.blobs import BlobStore
from pstore.store import records

pytest.importorskip("zstandard") if sys.version_info < (3, 14) else None


def _value() -> dict:
    return {"ramp": np.arange(500_000) % 7, "text": ["the same words"] * 4000, "small": 1}


def test_records_and_blobs_round_trip_through_zstd(opener, path, backend_name):
    value = _value()
    with opener(compression="zstd") as store:
        store["v"] = value
        store["other"] = [value["text"], "more"]
    for readonly in (False, True):
        with opener("r", readonly_buffers=readonly) as store:   # no compression option needed
            loaded = store["v"]
            np.testing.assert_array_equal(loaded["ramp"], value["ramp"])
            assert loaded["text"] == value["text"] and loaded["small"] == 1
            assert loaded["ramp"].flags.writeable is not readonly
            assert store["other"] == [value["text"], "more"]
            # (PostgreSQLBackend has no record_ids yet, which verify walks.)
            assert backend_name == "postgresql" or store.verify().ok
    if backend_name != "postgresql":
        blobs = BlobStore(path + ".blobs")
        [name] = blobs.names()
        assert os.path.getsize(blobs.path_of(name)) < 50_000    # 4 MB of int64 compressed


def test_records_of_every_codec_read_side_by_side(opener):
    for compression in (None, "zlib", "lzma", "zstd"):
        with opener(compression=compression) as store:
            store[str(compression)] = [compression] * 1000
            store[f"{compression} array"] = np.full(100_000, len(str(compression)))
    with opener("r") as store:
        for compression in (None, "zlib", "lzma", "zstd"):
            assert store[str(compression)] == [compression] * 1000
            assert (store[f"{compression} array"] == len(str(compression))).all()


_NO_ZSTD = """
    import sys
    sys.modules["zstandard"] = None         # an interpreter without the package
    sys.modules["compression"] = None       # ... and without the stdlib's (3.14+)
    sys.modules["compression.zstd"] = None
    import pstore
"""


def _without_zstd(script: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(_NO_ZSTD) + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_without_zstd_opening_with_it_says_what_to_install_and_writes_nothing(tmp_path):
    path = str(tmp_path / "store.db")
    result = _without_zstd(f"""
        try:
            pstore.open({path!r}, compression="zstd")
        except pstore.MissingModuleError as error:
            assert isinstance(error, ModuleNotFoundError)
            print(error.name, "|", error)
        with pstore.open({path!r}, compression="zlib") as store:     # the others work
            store["k"] = "v"
    """)
    assert result.returncode == 0, result.stderr
    name, message = result.stdout.strip().split(" | ")
    assert name == "zstandard"
    assert "pip install 'pstore[zstd]'" in message and "compression.zstd" in message
    assert pstore.open(path, "r")["k"] == "v"


@pytest.mark.parametrize("key", ["record", "array"])
def test_without_zstd_reading_zstd_data_names_the_module_and_the_object(tmp_path, key):
    path = str(tmp_path / "store.db")
    with pstore.open(path, compression="zstd") as store:
        store["record"] = ["compressible"] * 1000
        store["array"] = np.zeros(100_000)
        store["plain"] = 1
    with sqlite3.connect(path) as conn:
        [(oid,)] = conn.execute("SELECT oid FROM keys WHERE key = ?", (key,))
    with open(path, "rb") as file:
        before = file.read()
    result = _without_zstd(f"""
        store = pstore.open({path!r}, "r")
        assert store["plain"] == 1
        try:
            store[{key!r}]
        except pstore.MissingModuleError as error:     # a ModuleNotFoundError, not damage
            assert isinstance(error, ModuleNotFoundError)
            print(error.name, "|", error, "|", " ".join(getattr(error, "__notes__", [])))
    """)
    assert result.returncode == 0, result.stderr
    name, message, notes = result.stdout.strip().split(" | ")
    assert name == "zstandard" and "pip install 'pstore[zstd]'" in message
    assert str(oid) in notes and path in notes, notes
    with open(path, "rb") as file:
        assert file.read() == before


def test_the_codec_number_of_zstd_is_the_documented_3():
    assert records.CODECS["zstd"] == 3
    assert records.pack(1, b"compressible " * 100, [], 3)[2] == 3
