"""BLAKE3 blob names (issue 15): new blobs are named ``b3-<BLAKE3>``; the BLAKE2b-named
blobs of a format version 3 store (tests/data/format3, written by that pstore) keep their
names and load as they are, side by side with new ones; dedup holds within one hash; gc
and verify take both."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import pstore
from pstore.backends.blobs import (
    BLAKE2B_TREE,
    BLAKE3,
    BlobStore,
    blob_digest,
    naming_of,
)
from pstore.engine import PickleBuffer
from tests.data.make_format3 import BLOB

_DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "format3")
_STORES = {"sqlite": ("store.sqlite", "sqlite"), "dbm.dumb": ("store.dumb", "dbm:dbm.dumb")}


@pytest.fixture(params=sorted(_STORES))
def old_store(request: pytest.FixtureRequest, tmp_path) -> tuple[str, str]:
    """(path, backend) of a copy of a format version 3 store holding one BLAKE2b blob."""
    name, backend = _STORES[request.param]
    for entry in os.listdir(_DATA):
        if entry.startswith(name):
            source, target = os.path.join(_DATA, entry), str(tmp_path / entry)
            (shutil.copytree if os.path.isdir(source) else shutil.copyfile)(source, target)
    return str(tmp_path / name), backend


def _names(path: str) -> set[str]:
    return set(BlobStore(path + ".blobs").names())


def test_an_old_blob_keeps_its_name_and_loads_read_only(old_store):
    path, backend = old_store
    before = {name: os.path.getmtime(BlobStore(path + ".blobs").path_of(name))
              for name in _names(path)}
    assert set(before) == {blob_digest(BLOB, BLAKE2B_TREE)}
    with pstore.open(path, "r", backend=backend) as store:
        assert bytes(store["array"]) == BLOB
        assert store["list"] == [1, "two", 3.0]
        assert store.verify().ok
    assert {name: os.path.getmtime(BlobStore(path + ".blobs").path_of(name))
            for name in _names(path)} == before


def test_new_blobs_get_blake3_names_beside_the_old_ones(old_store):
    path, backend = old_store
    old = blob_digest(BLOB, BLAKE2B_TREE)
    with pstore.open(path, "w", backend=backend, blob_threshold=1024) as store:
        store["same bytes"] = PickleBuffer(bytearray(BLOB))     # another hash: another file
        store["other bytes"] = PickleBuffer(bytearray(BLOB[::-1]))
        store["same again"] = PickleBuffer(bytearray(BLOB))     # dedup within BLAKE3
        assert store.info().format_version == 5
    new, other = blob_digest(BLOB), blob_digest(BLOB[::-1])
    assert _names(path) == {old, new, other}
    assert [naming_of(name) for name in (old, new, other)] == [BLAKE2B_TREE, BLAKE3, BLAKE3]
    with pstore.open(path, "r", backend=backend) as store:
        assert bytes(store["array"]) == bytes(store["same bytes"]) == bytes(store["same again"])
        assert bytes(store["other bytes"]) == BLOB[::-1]
        report = store.verify()
        assert report.ok and report.blobs == 3, report


def test_gc_keeps_both_kinds_while_used_and_removes_both_when_not(old_store):
    path, backend = old_store
    with pstore.open(path, "w", backend=backend, blob_threshold=1024) as store:
        store["new"] = PickleBuffer(bytearray(BLOB[::-1]))
        store.gc()
        assert len(_names(path)) == 2
        del store["array"], store["new"]
        store.gc()
    assert _names(path) == set()


def test_verify_rehashes_each_blob_by_the_hash_its_name_says(old_store):
    path, backend = old_store
    with pstore.open(path, "w", backend=backend, blob_threshold=1024) as store:
        store["new"] = PickleBuffer(bytearray(BLOB[::-1]))
    blobs = BlobStore(path + ".blobs")
    for name in sorted(_names(path)):
        assert blobs.verify(name) is None
        with open(blobs.path_of(name), "r+b") as file:     # one flipped byte
            file.seek(100)
            byte = file.read(1)
            file.seek(100)
            file.write(bytes([byte[0] ^ 1]))
        assert "holds other bytes than its name says" in blobs.verify(name)
    with pstore.open(path, "r", backend=backend) as store:
        report = store.verify()
    assert not report.ok and len(report.problems) == 2, report


def test_without_blake3_pstore_imports_and_reads_and_a_blob_write_says_what_to_install(
        old_store):
    path, backend = old_store
    script = textwrap.dedent(f"""
        import sys
        sys.modules["blake3"] = None        # an interpreter without pstore's dependency
        import pstore
        from pstore.engine import PickleBuffer
        with pstore.open({path!r}, "w", backend={backend!r}, blob_threshold=1024) as store:
            assert bytes(store["array"]) == bytes(range(256)) * 16     # BLAKE2b: read
            store["small"] = 1
        try:
            with pstore.open({path!r}, "w", backend={backend!r}, blob_threshold=1024) as store:
                store["new"] = PickleBuffer(bytearray(5000))
        except pstore.engine.PicklingError as error:    # the store's, naming the key
            assert "key 'new'" in str(error), error
            cause = error.__cause__
            assert isinstance(cause, pstore.MissingModuleError), repr(cause)
            print(cause.name, "|", cause)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr
    name, message = result.stdout.strip().split(" | ")
    assert name == "blake3" and "pip install blake3" in message
    with pstore.open(path, "r", backend=backend) as store:
        assert store["small"] == 1 and "new" not in store
    assert _names(path) == {blob_digest(BLOB, BLAKE2B_TREE)}
