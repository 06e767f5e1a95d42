"""Nothing outside the store is touched (issue 11, blobs): links and odd entries planted in
the blob folder are never followed, never removed, and reported; a blob file replaced by a
link is refused at load. Every test snapshots a folder outside the store (bytes, mtimes and
names) and checks it is exactly as it was afterwards."""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np
import pytest

import pstore
from pstore.backends.blobs import BlobStore

ARRAY = np.arange(50_000, dtype=np.int64)      # 400 KB: one blob
FAKE_NAME = "ab" + "0" * 62                     # named like a blob, referenced by nothing


def outside_folder(tmp_path) -> str:
    """A folder beside the store holding files an attacker wants deleted or overwritten,
    some of them named the way pstore names its own files."""
    folder = tmp_path / "home"
    (folder / "ab").mkdir(parents=True)
    for name, content in {"id_rsa": b"PRIVATE KEY", "known_hosts": b"host ssh-ed25519 AAAA",
                          "notes.txt": b"notes", ".tmp-planted": b"temporary?",
                          f"ab/{FAKE_NAME}": b"looks like a blob",
                          f"{FAKE_NAME}": b"looks like a blob too"}.items():
        (folder / name).write_bytes(content)
    return str(folder)


def snapshot(folder: str) -> dict[str, tuple[int, int, str]]:
    """relative path -> (mode, mtime_ns, sha256 of the bytes) of everything under ``folder``."""
    result = {}
    for directory, folders, files in os.walk(folder):
        for name in folders + files:
            full = os.path.join(directory, name)
            info = os.lstat(full)
            digest = ""
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as file:
                    digest = hashlib.sha256(file.read()).hexdigest()
            result[os.path.relpath(full, folder)] = (info.st_mode, info.st_mtime_ns, digest)
    return result


def fan_out_of(name: str) -> str:
    """The fan-out folder of a new blob: the first two digits after "b3-"."""
    assert name.startswith("b3-")
    return name[3:5]


def stored_blob(opener, path: str) -> str:
    """Store ARRAY under key "a" and return its blob's name."""
    with opener() as store:
        store["a"] = ARRAY
    (name,) = BlobStore(path + ".blobs").names()
    return name


def gc_reports(opener, planted: str) -> int:
    """Run gc; check it warned about ``planted``; return what gc returned."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with opener() as store:
            collected = store.gc()
    assert any(planted in str(warning.message) for warning in caught), \
        [str(warning.message) for warning in caught]
    return collected


def test_a_symlinked_fan_out_folder_is_neither_followed_nor_emptied(opener, path, tmp_path):
    home = outside_folder(tmp_path)
    stored_blob(opener, path)
    planted = os.path.join(path + ".blobs", "ab")
    if os.path.lexists(planted):
        pytest.skip("the array's blob happens to live in ab/")
    os.symlink(os.path.join(home, "ab"), planted)
    before = snapshot(home)
    with opener() as store:
        del store["a"]
    gc_reports(opener, planted)
    assert snapshot(home) == before
    assert os.path.islink(planted)
    assert [entry.path for entry in BlobStore(path + ".blobs").odd_entries()] == [planted]
    assert list(BlobStore(path + ".blobs").names()) == []    # the real blob was collected


def test_a_fan_out_folder_replaced_by_a_link_is_refused_at_load_and_write(opener, path,
                                                                          tmp_path):
    home = outside_folder(tmp_path)
    name = stored_blob(opener, path)
    fan = fan_out_of(name)
    fan_out = os.path.join(path + ".blobs", fan)
    os.rename(fan_out, fan_out + "-moved")
    os.mkdir(os.path.join(home, fan))
    with open(os.path.join(home, fan, name), "wb") as file:    # other bytes, same size
        file.write(bytes(ARRAY.nbytes))
    os.symlink(os.path.join(home, fan), fan_out)
    before = snapshot(home)
    with opener() as store:
        with pytest.raises(pstore.Error) as raised:
            store["a"]
        assert isinstance(raised.value, ValueError) and fan_out in str(raised.value)
        with pytest.raises(Exception, match="symbolic link"):
            store["b"] = ARRAY + 0      # the same bytes: its blob would go through the link
        assert "b" not in store
    assert snapshot(home) == before


def test_a_symlinked_blob_folder_is_refused_and_left_alone(opener, path, tmp_path):
    home = outside_folder(tmp_path)
    os.symlink(home, path + ".blobs")
    before = snapshot(home)
    with opener() as store:
        store["small"] = 1
        with pytest.raises(Exception, match="symbolic link") as raised:
            store["a"] = ARRAY
        assert path + ".blobs" in str(raised.value)
        assert "a" not in store and store["small"] == 1
    gc_reports(opener, path + ".blobs")
    assert snapshot(home) == before
    assert BlobStore(path + ".blobs").odd_entries()[0].path == path + ".blobs"


def test_a_folder_where_a_blob_file_belongs_is_reported_not_an_isadirectoryerror(
        opener, path, tmp_path):
    name = stored_blob(opener, path)
    fan_out = os.path.join(path + ".blobs", fan_out_of(name))
    planted = os.path.join(fan_out, "b3-" + fan_out_of(name) + "f" * 62)
    os.mkdir(planted)
    with open(os.path.join(planted, "inside"), "wb") as file:
        file.write(b"kept")
    assert gc_reports(opener, planted) == 0
    assert os.path.isdir(planted) and os.listdir(planted) == ["inside"]
    # The referenced blob itself replaced by a folder: refused at load, naming it.
    os.rename(os.path.join(fan_out, name), os.path.join(fan_out, "moved"))
    os.mkdir(os.path.join(fan_out, name))
    with opener("r") as store:
        with pytest.raises(pstore.Error, match="a folder where a blob file belongs") as raised:
            store["a"]
        assert os.path.join(fan_out, name) in str(raised.value)


def test_a_blob_file_replaced_by_a_symlink_is_refused_at_load(opener, path, tmp_path):
    home = outside_folder(tmp_path)
    name = stored_blob(opener, path)
    blob = os.path.join(path + ".blobs", fan_out_of(name), name)
    target = os.path.join(home, "id_rsa")
    os.unlink(blob)
    os.symlink(target, blob)
    before = snapshot(home)
    for flag in ("r", "w"):
        with opener(flag) as store:
            with pytest.raises(pstore.Error, match="a symbolic link where a blob file") as raised:
                store["a"]
            assert isinstance(raised.value, ValueError) and blob in str(raised.value)
    # Unreferenced now: gc reports the link instead of removing it (or its target).
    with opener() as store:
        del store["a"]
    gc_reports(opener, blob)
    assert os.path.islink(blob) and snapshot(home) == before


def test_a_stray_temporary_symlink_is_left_alone(opener, path, tmp_path):
    home = outside_folder(tmp_path)
    stored_blob(opener, path)
    planted = os.path.join(path + ".blobs", ".tmp-planted")
    os.symlink(os.path.join(home, "notes.txt"), planted)
    killed_writer = os.path.join(path + ".blobs", ".tmp-killed")
    with open(killed_writer, "wb") as file:     # what a writer killed in put() leaves
        file.write(b"half a blob")
    before = snapshot(home)
    gc_reports(opener, planted)
    assert os.path.islink(planted) and not os.path.exists(killed_writer)
    assert snapshot(home) == before
    with opener("r") as store:
        assert np.array_equal(store["a"], ARRAY)


def test_odd_names_and_files_are_skipped_and_listed(opener, path):
    name = stored_blob(opener, path)
    folder = path + ".blobs"
    planted = {
        os.path.join(folder, "README"): "file",
        os.path.join(folder, "zz"): "folder",                               # not hex
        os.path.join(folder, fan_out_of(name), name.upper()): "file",       # not our spelling
        os.path.join(folder, fan_out_of(name), name[:-1]): "file",          # too short
        os.path.join(folder, fan_out_of(name), "b3-cd" + name[5:]): "file", # wrong fan-out
    }
    for entry, kind in planted.items():
        if kind == "folder":
            os.mkdir(entry)
        else:
            with open(entry, "wb") as file:
                file.write(b"planted")
    blobs = BlobStore(folder)
    assert list(blobs.names()) == [name]
    assert sorted(entry.path for entry in blobs.odd_entries()) == sorted(planted)
    with opener() as store:
        del store["a"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with opener() as store:
            store.gc()
    assert len(caught) == len(planted)
    assert all(os.path.lexists(entry) for entry in planted)
    assert list(blobs.names()) == []


def test_a_dangling_link_as_the_blob_folder_creates_nothing_at_its_target(opener, path,
                                                                          tmp_path):
    target = tmp_path / "would-be-created"
    os.symlink(target, path + ".blobs")
    with opener() as store:
        with pytest.raises(Exception, match="symbolic link"):
            store["a"] = ARRAY
    assert not os.path.lexists(target) and os.path.islink(path + ".blobs")
