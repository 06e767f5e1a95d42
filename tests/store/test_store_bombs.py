"""Decompression bombs and huge declared sizes cost bounded memory, measured in a fresh
process: a record or blob that inflates past what its envelope declares, or declares
more than the store allows or than it holds, is a CorruptionError naming it, and loading
it adds less than 100 MB to the process's peak memory."""

from __future__ import annotations

import lzma
import os
import sqlite3
import subprocess
import sys
import textwrap
import zlib

import pytest

import pstore
from pstore.engine import PickleBuffer
from pstore.store import records

_LIMIT_KB = 100 * 1024      # 100 MB, in ru_maxrss's unit (KiB on Linux)


def _bomb(codec: str, megabytes: int) -> bytes:
    """A stream that inflates to ``megabytes`` MiB of zeros."""
    compressor = {"zlib": lambda: zlib.compressobj(9),
                  "lzma": lambda: lzma.LZMACompressor(preset=0),
                  "zstd": lambda: records.blobio._compressor(records.CODECS["zstd"])}[codec]()
    zeros = bytes(1 << 20)
    return b"".join([*(compressor.compress(zeros) for _ in range(megabytes)),
                     compressor.flush()])


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {"zlib": _bomb("zlib", 400), "lzma": _bomb("lzma", 200), "zstd": _bomb("zstd", 400)}


def _envelope(oid: int, codec: int, declared: int, payload: bytes,
              blobs: list[records.BlobRef] = ()) -> bytes:
    """A record whose digest verifies, with whatever it declares (a forger needs no key)."""
    body = records._HEADER.pack(0xFF, records._VERSION, codec, len(blobs), declared)
    body += b"".join(records._pack_blob(blob) for blob in blobs)
    body += payload
    return records.seal(oid, body)


def _peak_of_loading(path: str, key: str) -> tuple[str, int]:
    """(what loading ``key`` raised, peak memory it added in KiB), in a fresh process."""
    script = textwrap.dedent(f"""
        import resource, pstore
        store = pstore.open({path!r}, "r")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            store[{key!r}]
            outcome = "loaded"
        except pstore.CorruptionError as error:
            outcome = "CorruptionError " + str(error)
        except BaseException as error:
            outcome = "foreign " + repr(error)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        print(outcome)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()}, check=True)
    added, outcome = result.stdout.strip().split("\n", 1)
    return outcome, int(added)


def _replace_record(path: str, key: str, make: callable) -> int:
    with sqlite3.connect(path) as conn:
        [(oid, data)] = conn.execute("SELECT keys.oid, data FROM keys JOIN records"
                                     " ON records.oid = keys.oid WHERE key = ?", (key,))
        conn.execute("UPDATE records SET data = ? WHERE oid = ?", (make(oid, data), oid))
    return oid


@pytest.mark.parametrize("codec", ["zlib", "lzma", "zstd"])
@pytest.mark.parametrize("declared", [1000, 1 << 40])
def test_a_record_bomb_stops_at_its_declared_size_or_the_limit(tmp_path, bombs, codec,
                                                                 declared):
    path = str(tmp_path / "store.db")
    with pstore.open(path) as store:
        store["bomb"] = "placeholder"
    number = records.CODECS[codec]
    oid = _replace_record(path, "bomb",
                          lambda oid, _: _envelope(oid, number, declared, bombs[codec]))
    outcome, added = _peak_of_loading(path, "bomb")
    assert outcome.startswith("CorruptionError"), outcome
    assert f"key 'bomb', object id {oid}" in outcome and path in outcome
    expected = ("max_record_size" if declared > pstore.store.store.DEFAULT_MAX_RECORD_SIZE
                else "more than the 1000 bytes it declares")
    assert expected in outcome
    assert added < _LIMIT_KB, f"{added} KiB"


@pytest.mark.parametrize("codec", ["zlib", "lzma", "zstd"])
def test_a_blob_bomb_stops_at_the_size_its_record_declares(tmp_path, bombs, codec):
    path = str(tmp_path / "store.db")
    with pstore.open(path, compression=codec) as store:
        store["array"] = PickleBuffer(bytearray(os.urandom(100_000)))
    [blob] = [os.path.join(root, name) for root, _, names in os.walk(path + ".blobs")
              for name in names]
    with open(blob, "wb") as file:
        file.write(bombs[codec])
    outcome, added = _peak_of_loading(path, "array")
    assert outcome.startswith("CorruptionError") and "key 'array'" in outcome, outcome
    assert "more than the 100000 bytes it declares" in outcome
    assert added < _LIMIT_KB, f"{added} KiB"


def test_a_huge_declared_blob_size_allocates_nothing_up_front(tmp_path):
    path = str(tmp_path / "store.db")
    with pstore.open(path, compression="zlib") as store:
        store["array"] = PickleBuffer(bytearray(os.urandom(100_000)))

    def declare_3_gib(oid: int, data: bytes) -> bytes:
        unpacked = records.unpack(data, oid)
        [blob] = unpacked.blobs
        compressed = records.blobio.compress(records.CODECS["zlib"], unpacked.payload)
        return _envelope(oid, 1, len(unpacked.payload), compressed,
                         [blob._replace(size=3 << 30)])

    _replace_record(path, "array", declare_3_gib)
    [blob] = [os.path.join(root, name) for root, _, names in os.walk(path + ".blobs")
              for name in names]
    with open(blob, "wb") as file:      # 20 bytes
        file.write(zlib.compress(b"twelve bytes"))
    outcome, added = _peak_of_loading(path, "array")
    assert outcome.startswith("CorruptionError") and "key 'array'" in outcome, outcome
    assert f"holds 12 bytes, its record says {3 << 30}" in outcome
    assert added < _LIMIT_KB, f"{added} KiB"
