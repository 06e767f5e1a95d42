"""The blob files (pstore/backends/blobs.py): the digest that names them, and streaming."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from pstore.backends.blobs import LEAF_SIZE, BlobStore, blob_digest


def reference_digest(data: bytes) -> str:
    """docs/format.md, "Blobs", written out independently of the code under test."""
    leaves = [data[i:i + LEAF_SIZE] for i in range(0, len(data), LEAF_SIZE)] or [b""]
    root = hashlib.blake2b(digest_size=32, person=b"pstore-blob")
    root.update(len(data).to_bytes(8, "little"))
    for leaf in leaves:
        root.update(hashlib.blake2b(leaf, digest_size=32, person=b"pstore-leaf").digest())
    return root.hexdigest()


SIZES = [0, 1, 1000, LEAF_SIZE - 1, LEAF_SIZE, LEAF_SIZE + 1, 2 * LEAF_SIZE + LEAF_SIZE // 2]


@pytest.fixture(scope="module")
def data() -> bytes:
    return random.Random(6).randbytes(max(SIZES))


@pytest.mark.parametrize("size", SIZES)
def test_the_digest_is_the_documented_hash_tree(data, size):
    assert blob_digest(data[:size]) == reference_digest(data[:size])


@pytest.mark.parametrize("size", SIZES)
def test_a_blob_streamed_in_any_chunks_gets_the_same_name(tmp_path, data, size):
    blobs = BlobStore(str(tmp_path / "blobs"))
    rng = random.Random(size)
    chunks, start = [], 0
    while start < size:     # chunk sizes that straddle leaf boundaries, and whole leaves
        step = rng.choice([1, 4095, LEAF_SIZE, LEAF_SIZE + 7, 3 * LEAF_SIZE])
        chunks.append(memoryview(data)[start:min(start + step, size)])
        start += step
    name = blobs.put(chunks)
    blobs.end(committed=True)
    assert name == blob_digest(data[:size])
    with open(blobs.path_of(name), "rb") as file:
        assert file.read() == data[:size]
    assert os.stat(blobs.path_of(name)).st_mode & 0o777 == 0o600
    assert bytes(blobs.open(name, size, writable=False)) == data[:size]


def test_a_failing_chunk_source_leaves_no_file(tmp_path):
    blobs = BlobStore(str(tmp_path / "blobs"))

    def chunks():
        yield b"x" * LEAF_SIZE
        raise OSError("the source failed")
    with pytest.raises(OSError, match="the source failed"):
        blobs.put(chunks())
    assert os.listdir(blobs.directory) == []
