"""BlobStore on a folder with planted entries: writes refuse what pstore did not make,
:meth:`BlobStore.verify` re-hashes, and temporary files never go through a link."""

from __future__ import annotations

import os
import pickle

import pytest

import pstore
from pstore.backends.blobs import BlobStore, blob_digest

DATA = b"some bytes of a blob" * 1000


@pytest.fixture
def blobs(tmp_path) -> BlobStore:
    return BlobStore(str(tmp_path / "store.db.blobs"))


def put(blobs: BlobStore, data: bytes = DATA) -> str:
    name = blobs.put([data])
    blobs.end(committed=True)
    return name


def test_verify_says_what_is_wrong_with_a_blob(blobs, tmp_path):
    name = put(blobs)
    assert blobs.verify(name) is None
    empty = put(blobs, b"")
    assert blobs.verify(empty) is None
    blob = blobs.path_of(name)
    with open(blob, "r+b") as file:
        file.seek(1234)
        file.write(b"X")
    assert "holds other bytes than its name says" in blobs.verify(name)
    assert blob in blobs.verify(name)
    os.unlink(blob)
    assert blobs.verify(name) == f"blob file {blob} is missing"
    outside = tmp_path / "outside"
    outside.write_bytes(DATA)       # the right bytes, but not pstore's file
    os.symlink(outside, blob)
    assert "a symbolic link where a blob file belongs" in blobs.verify(name)


def test_a_link_where_a_new_blob_goes_is_refused_and_kept(blobs, tmp_path):
    put(blobs, b"another blob")
    name = blob_digest(DATA)
    os.makedirs(os.path.dirname(blobs.path_of(name)), exist_ok=True)
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    os.symlink(target, blobs.path_of(name))
    with pytest.raises(pstore.CorruptionError, match="a symbolic link where a blob file"):
        blobs.put([DATA])
    assert target.read_bytes() == b"keep me" and os.path.islink(blobs.path_of(name))
    assert [entry for entry in os.listdir(blobs.directory) if entry.startswith(".tmp-")] == []


def test_temporary_files_get_fresh_names_and_never_follow_a_link(blobs, tmp_path):
    put(blobs, b"first")        # creates the folder
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    # Links under every name a writer could have picked with a guessable scheme.
    for suffix in ("0", "1", "x", "tmp", "aaaaaaaa"):
        os.symlink(target, os.path.join(blobs.directory, f".tmp-{suffix}"))
    name = put(blobs)
    with open(blobs.path_of(name), "rb") as file:
        assert file.read() == DATA
    assert target.read_bytes() == b"keep me"
    assert sorted(entry.path for entry in blobs.odd_entries()) == sorted(
        os.path.join(blobs.directory, f".tmp-{suffix}")
        for suffix in ("0", "1", "x", "tmp", "aaaaaaaa"))


def test_a_rolled_back_blob_is_removed_but_a_link_put_in_its_place_is_not(blobs, tmp_path):
    name = blobs.put([DATA])
    blob = blobs.path_of(name)
    os.unlink(blob)
    target = tmp_path / "target"
    target.write_bytes(b"keep me")
    os.symlink(target, blob)
    blobs.end(committed=False)
    assert os.path.islink(blob) and target.read_bytes() == b"keep me"


def test_a_fifo_where_a_blob_belongs_does_not_block(blobs):
    name = put(blobs)
    os.unlink(blobs.path_of(name))
    os.mkfifo(blobs.path_of(name))
    with pytest.raises(pstore.CorruptionError, match="a special file where a blob file"):
        blobs.open(name, len(DATA), writable=False)
    assert "a special file" in blobs.verify(name)


def test_corruption_error_keeps_its_facts_through_pickling():
    error = pstore.CorruptionError("/x/s.db", "page 3 is damaged", key="k", object_id=7)
    again = pickle.loads(pickle.dumps(error))
    assert (again.path, again.what, again.key, again.object_id) == ("/x/s.db",
                                                                     "page 3 is damaged", "k", 7)
    assert str(again) == str(error) == \
        "store '/x/s.db' is damaged, key 'k', object id 7: page 3 is damaged"
    assert isinstance(again, pstore.Error) and isinstance(again, ValueError)
