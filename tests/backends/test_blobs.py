"""The blob files (pstore/backends/blobs.py): the digest that names them, and streaming."""

from __future__ import annotations

import hashlib
import os
import random
import sys

import blake3
import pytest

from pstore.backends.blobs import (
    BLAKE2B_TREE,
    BLAKE3,
    LEAF_SIZE,
    BlobStore,
    blob_digest,
    digest_of_name,
    name_of_digest,
    naming_of,
)


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
def test_the_blake2b_digest_is_the_documented_hash_tree(data, size):
    assert blob_digest(data[:size], BLAKE2B_TREE) == reference_digest(data[:size])


@pytest.mark.parametrize("size", SIZES)
def test_new_blobs_are_named_b3_and_their_blake3_digest(data, size):
    assert blob_digest(data[:size]) == "b3-" + blake3.blake3(data[:size]).hexdigest()


def test_the_blake3_name_of_nothing_is_the_published_test_vector():
    assert blob_digest(b"") == ("b3-af1349b9f5f9a1a6a0404dea36dcc949"
                                "9bcb25c9adc112b7cc9a93cae41f3262")


def test_a_name_tells_its_hash_and_digest_and_nothing_else_is_a_name(data):
    for naming in (BLAKE2B_TREE, BLAKE3):
        name = blob_digest(data[:1000], naming)
        assert naming_of(name) == naming
        assert name_of_digest(*digest_of_name(name)) == name
    hex64 = "ab" * 32
    for odd in ["", hex64[:-1], hex64 + "0", hex64.upper(), "b3-" + hex64[:-1], "b3" + hex64,
                "b2-" + hex64, "b3-" + hex64.upper(), "b3-../" + hex64[6:], hex64[:-1] + "g"]:
        assert digest_of_name(odd) is None, odd
        with pytest.raises(ValueError, match="not a blob name"):
            naming_of(odd)
    with pytest.raises(ValueError, match="blob naming 2 is unknown"):
        name_of_digest(2, bytes(32))


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


def test_a_failing_flush_fails_the_settle_until_the_end_and_leaves_no_file(
        tmp_path, monkeypatch):
    # A blob's flush runs in the background after it is written (blobs._last_flush),
    # and settle waits for it: its failure is settle's failure, so the transaction
    # cannot commit. (An I/O error cannot be made to happen for real here: the failing
    # call is substituted.)
    from pstore.backends import blobs as blob_files

    calls = []

    def fdatasync(fd):
        calls.append(fd)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(blob_files, "_fdatasync", fdatasync)
    store = BlobStore(str(tmp_path / "blobs"))
    size = blob_files._PIECE_SIZE + blob_files._OVERLAP_MIN    # written in two pieces
    name = store.put([memoryview(bytes(size))])
    for _ in range(2):      # raised again by the next settle: the failure sticks
        with pytest.raises(OSError, match="Input/output error"):
            store.settle()
    with pytest.raises(OSError, match="Input/output error"):    # a read settles first
        store.open(name, size, writable=False)
    assert len(calls) == 1
    assert os.listdir(store.directory) == []
    store.end(committed=False)
    monkeypatch.setattr(blob_files, "_fdatasync", os.fdatasync)
    assert store.put([b"after"]) == blob_digest(b"after")   # the next transaction settles
    store.settle()
    assert os.path.exists(store.path_of(blob_digest(b"after")))


def test_a_blob_has_its_name_only_once_settled(tmp_path):
    store = BlobStore(str(tmp_path / "blobs"))
    names = [store.put([data]) for data in (b"one", b"two", b"one")]
    assert names[0] == names[2] == blob_digest(b"one")
    assert not any(os.path.exists(store.path_of(name)) for name in names)
    temporaries = os.listdir(store.directory)
    assert len(temporaries) == 3 and all(t.startswith(".tmp-") for t in temporaries)
    store.settle()
    for name, data in zip(names, (b"one", b"two", b"one"), strict=True):
        with open(store.path_of(name), "rb") as file:
            assert file.read() == data
    # The second copy of b"one" was dropped, not renamed over the first.
    assert sorted(os.listdir(store.directory)) == sorted({n[3:5] for n in names})
    assert sum(len(os.listdir(os.path.join(store.directory, d)))
               for d in os.listdir(store.directory)) == 2


def test_a_read_in_the_transaction_finds_a_blob_put_by_it(tmp_path):
    store = BlobStore(str(tmp_path / "blobs"))
    name = store.put([b"mapped at once"])
    assert bytes(store.open(name, 14, writable=False)) == b"mapped at once"
    assert list(store.names()) == [name]


def test_a_rollback_deletes_the_unsettled_and_the_settled(tmp_path):
    store = BlobStore(str(tmp_path / "blobs"))
    settled = store.put([b"settled"])
    store.settle()
    store.put([b"unsettled"])
    store.end(committed=False)
    assert not os.path.exists(store.path_of(settled))
    assert [entry for _, _, files in os.walk(store.directory) for entry in files] == []


def test_many_blobs_of_one_transaction_keep_few_flushes_in_flight(tmp_path):
    from pstore.backends import blobs as blob_files

    store = BlobStore(str(tmp_path / "blobs"))
    names = [store.put([b"%d" % i]) for i in range(3 * blob_files._UNSETTLED_FLUSHES)]
    running = sum(entry.flush.running() for entry in store._unsettled)
    assert running <= blob_files._UNSETTLED_FLUSHES
    store.settle()
    store.end(committed=True)
    assert all(os.path.exists(store.path_of(name)) for name in names)



def resident_share(path: str) -> float:
    """The share of ``path``'s pages in the page cache (Linux's mincore(2))."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    flags = ctypes.create_string_buffer(pages)
    with open(path, "rb") as file:
        # Copy-on-write: writable for ctypes, and nothing is ever written through it.
        with mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
            start = ctypes.c_char.from_buffer(mapped)
            try:
                assert libc.mincore(ctypes.addressof(start), size, flags) == 0, \
                    os.strerror(ctypes.get_errno())
            finally:
                del start   # the mapping cannot close while ctypes holds it
    return sum(flag & 1 for flag in flags.raw) / pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore(2) as on Linux")
def test_a_large_blob_stays_in_the_page_cache_after_its_writeback_starts(tmp_path):
    """The writeback of each written piece is started with POSIX_FADV_DONTNEED, which
    drops clean pages: the pages just written are dirty and must stay, so that a load
    right after the write reads memory, not the disk."""
    from pstore.backends import blobs as blob_files

    store = BlobStore(str(tmp_path / "blobs"))
    data = os.urandom(2 * blob_files._PIECE_SIZE + blob_files._OVERLAP_MIN)
    name = store.put([data])
    store.settle()
    assert resident_share(store.path_of(name)) > 0.95
    with open(store.path_of(name), "rb") as file:
        assert file.read() == data
    store.end(committed=True)
