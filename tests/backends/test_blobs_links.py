"""BlobStore on a folder with planted entries: writes refuse what pstore did not make,
:meth:`BlobStore.verify` re-hashes, and temporary files never go through a link."""

from __future__ import annotations

import os
import pickle
import tempfile
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
        blobs.settle()      # where the blob is moved into place, before the commit
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
    blobs.settle()
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
        "store '/x/s.db' is damaged (key 'k', object id 7): page 3 is damaged"
    assert isinstance(again, pstore.Error) and isinstance(again, ValueError)


_KINDS = ["file", "folder", "link to a file", "link to a folder", "dangling link", "fifo"]
_HEX = "0123456789abcdef"


@st.composite
def planted_entries(draw) -> list[tuple[str, str, str]]:
    """(fan-out folder, entry name, kind): some real blobs, the rest anything but."""
    entries = []
    for _ in range(draw(st.integers(1, 12))):
        fan_out = draw(st.sampled_from(["ab", "cd", "0f", "zz", "AB", "a"]))
        digest = fan_out[:2].lower().ljust(2, "0") + draw(st.text(_HEX, min_size=62,
                                                                 max_size=62))
        name = draw(st.sampled_from([digest, digest.upper(), digest[:63], "ee" + digest[2:],
                                     ".tmp-x", "notes.txt", digest + ".bak", "b3-" + digest,
                                     "b3-" + digest[:63], "B3-" + digest, "b3" + digest,
                                     "b3-ee" + digest[2:]]))
        entries.append((fan_out, name, draw(st.sampled_from(_KINDS))))
    return entries


def _plant(folder: str, entry: str, kind: str, outside: str) -> None:
    if kind == "file":
        with open(entry, "wb") as file:
            file.write(b"planted")
    elif kind == "folder":
        os.mkdir(entry)
    elif kind == "fifo":
        os.mkfifo(entry)
    else:
        target = {"link to a file": os.path.join(outside, "id_rsa"),
                  "link to a folder": outside,
                  "dangling link": os.path.join(outside, "created-through-a-link")}[kind]
        os.symlink(target, entry)


@settings(max_examples=40, deadline=None)
@given(entries=planted_entries(), keep=st.sets(st.integers(0, 11)))
def test_only_regular_files_named_like_blobs_are_blobs_and_only_those_are_collected(
        entries, keep):
    with tempfile.TemporaryDirectory() as scratch:
        outside = os.path.join(scratch, "home")
        os.mkdir(outside)
        with open(os.path.join(outside, "id_rsa"), "wb") as file:
            file.write(b"PRIVATE KEY")
        before = os.stat(os.path.join(outside, "id_rsa"))
        folder = os.path.join(scratch, "store.db.blobs")
        os.mkdir(folder)
        blobs_expected, odd_expected = set(), set()
        for fan_out, name, kind in entries:
            os.makedirs(os.path.join(folder, fan_out), exist_ok=True)
            entry = os.path.join(folder, fan_out, name)
            if os.path.lexists(entry):
                continue
            _plant(folder, entry, kind, outside)
            digits = name.removeprefix("b3-")     # BLAKE3 or BLAKE2b
            is_blob = (kind == "file" and len(digits) == 64 and digits[:2] == fan_out
                       and set(digits) <= set(_HEX))
            (blobs_expected if is_blob else odd_expected).add(entry)
        for fan_out in {fan_out for fan_out, _, _ in entries}:
            if len(fan_out) != 2 or not set(fan_out) <= set(_HEX):
                # An odd folder is listed itself; its entries are never looked into.
                odd_expected = {entry for entry in odd_expected
                                if os.path.dirname(entry) != os.path.join(folder, fan_out)}
                blobs_expected = {entry for entry in blobs_expected
                                  if os.path.dirname(entry) != os.path.join(folder, fan_out)}
                odd_expected.add(os.path.join(folder, fan_out))
        blobs = BlobStore(folder)
        names = sorted(blobs.names())
        assert names == sorted(os.path.basename(entry) for entry in blobs_expected)
        assert sorted(entry.path for entry in blobs.odd_entries()) == sorted(odd_expected)
        referenced = {name for index, name in enumerate(names) if index in keep}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert blobs.collect(referenced) == len(names) - len(referenced)
        blobs.end(committed=True)
        assert sorted(blobs.names()) == sorted(referenced)
        assert all(os.path.lexists(entry) for entry in odd_expected)
        assert sorted(os.listdir(outside)) == ["id_rsa"]
        after = os.stat(os.path.join(outside, "id_rsa"))
        assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
