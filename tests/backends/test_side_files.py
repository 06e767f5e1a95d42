"""Files beside a store (lock, commit counter, gate, journal, temporary files): never
followed through a link, only regular files owned by the store's owner; lock errors
name the holder. Each attack checks that every file outside the store is byte-for-byte
unchanged and that nothing is created through a link."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pstore
from pstore.backends import open_backend
from pstore.backends.dbm import DBMBackend
from pstore.backends.files import FileLock, _json_object
from pstore.errors import LockTimeoutError, UnsafeFileError

from .conftest import available_dbm_modules, snapshot

modules = pytest.mark.parametrize("module", available_dbm_modules())
SIDE_FILES = [".lock", ".commits", ".gate"]


@pytest.fixture
def outside(tmp_path):
    """A folder outside the store holding files an attacker points links at."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "id_rsa").write_bytes(b"SECRET KEY " * 10)
    (folder / "notes.txt").write_bytes(b"my notes\n")
    return folder


def store_in(tmp_path) -> str:
    folder = tmp_path / "store"
    folder.mkdir(exist_ok=True)
    return str(folder / "s.db")


def filled(path: str, module: str) -> None:
    with pstore.open(path, "c", backend=f"dbm:{module}") as store:
        store["k"] = "value"


@modules
@pytest.mark.parametrize("suffix", SIDE_FILES)
def test_a_side_file_replaced_by_a_link_is_refused(tmp_path, outside, module, suffix):
    path = store_in(tmp_path)
    filled(path, module)
    before = snapshot(str(outside))
    os.unlink(path + suffix)
    os.symlink(outside / "id_rsa", path + suffix)
    with pytest.raises(UnsafeFileError, match="symbolic link") as raised:
        with pstore.open(path, "w", backend=f"dbm:{module}") as store:
            store["k"] = "changed"
    assert path + suffix in str(raised.value)
    assert snapshot(str(outside)) == before


@modules
@pytest.mark.parametrize("suffix", SIDE_FILES)
def test_a_dangling_link_creates_nothing(tmp_path, outside, module, suffix):
    path = store_in(tmp_path)
    filled(path, module)
    os.unlink(path + suffix)
    os.symlink(outside / "created", path + suffix)
    with pytest.raises(UnsafeFileError):
        with pstore.open(path, "w", backend=f"dbm:{module}") as store:
            store["k"] = "changed"
    assert not (outside / "created").exists()
    os.unlink(path + suffix)
    with pstore.open(path, "r", backend=f"dbm:{module}") as store:
        assert store["k"] == "value"


def test_a_dangling_lock_link_creates_nothing_for_sqlite(tmp_path, outside):
    path = store_in(tmp_path)
    with pstore.open(path, "c", backend="sqlite") as store:
        store["k"] = 1
    before = snapshot(str(outside))
    os.unlink(path + ".lock")
    os.symlink(outside / "created", path + ".lock")
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        with pstore.open(path, "w", backend="sqlite") as store:
            store["k"] = 2
    assert not (outside / "created").exists()
    assert snapshot(str(outside)) == before


@modules
def test_a_directory_for_a_side_file_is_refused(tmp_path, module):
    path = store_in(tmp_path)
    filled(path, module)
    os.unlink(path + ".commits")
    os.mkdir(path + ".commits")
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        pstore.open(path, "r", backend=f"dbm:{module}").close()


@modules
def test_a_journal_link_planted_during_a_transaction_is_replaced_not_followed(
        tmp_path, outside, module):
    path = store_in(tmp_path)
    filled(path, module)
    before = snapshot(str(outside))
    with pstore.open(path, "w", backend=f"dbm:{module}") as store:
        with store.transaction():
            store["k"] = "new"
            os.symlink(outside / "id_rsa", path + ".journal")
            os.symlink(outside / "id_rsa", path + ".dir.saved")
    assert snapshot(str(outside)) == before
    assert not os.path.lexists(path + ".journal")
    with pstore.open(path, "r", backend=f"dbm:{module}") as store:
        assert store["k"] == "new"
    leftovers = [name for name in os.listdir(os.path.dirname(path)) if ".tmp-" in name]
    assert leftovers == []


def test_temporary_names_are_random_and_created_exclusively(tmp_path, outside):
    # A link planted at a guessable temporary name is never written through.
    from pstore.backends.files import replace_file
    target = str(tmp_path / "target")
    os.symlink(outside / "id_rsa", target + ".tmp")
    before = snapshot(str(outside))
    replace_file(target, [b"content"], fsync=False)
    assert snapshot(str(outside)) == before
    with open(target, "rb") as file:
        assert file.read() == b"content"


HOLDER = """
import sys, time
from pstore.backends.files import FileLock, _json_object
lock = FileLock(sys.argv[1], 5, names_holder=True)
assert lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_lock_timeout_names_the_holder(tmp_path):
    path = str(tmp_path / "s.db.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline() == b"locked\n"
        lock = FileLock(path, 0.1)
        with pytest.raises(LockTimeoutError) as raised:
            lock.lock("s.db")
        lock.close()
    finally:
        holder.kill()
        holder.wait()
    error = raised.value
    assert f"process {holder.pid} on " in str(error)
    assert "-c" in str(error) and "holding it since" in str(error)
    assert error.holder is not None and error.holder in str(error)
    import pickle
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


@pytest.mark.parametrize("backend", ["sqlite", "dbm"])
def test_a_store_lock_timeout_names_the_holder(tmp_path, backend):
    path = store_in(tmp_path)
    first = open_backend(backend, path, "c", lock_timeout=0.1, fsync=False)
    second = open_backend(backend, path, "w", lock_timeout=0.1, fsync=False)
    first.begin()
    try:
        with pytest.raises(LockTimeoutError, match=f"process {os.getpid()} on "):
            second.begin()
    finally:
        first.rollback()
        first.close()
        second.close()


def test_the_lock_stays_compatible_with_filelock(tmp_path):
    import filelock
    path = str(tmp_path / "s.db.lock")
    ours = FileLock(path, 0.05, names_holder=True)
    assert ours.acquire()
    with pytest.raises(filelock.Timeout):
        filelock.FileLock(path, timeout=0.05).acquire()
    ours.release()
    theirs = filelock.FileLock(path, timeout=0.05)
    theirs.acquire()
    assert not ours.acquire()
    theirs.release()
    ours.close()


root_only = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                               reason="changing a file's owner to another user needs root")


@root_only
@modules
def test_a_lock_file_owned_by_another_user_is_refused(tmp_path, module):
    path = store_in(tmp_path)
    filled(path, module)
    os.chown(path + ".lock", 12345, 12345)
    with pytest.raises(UnsafeFileError, match="owned by uid 12345") as raised:
        with pstore.open(path, "w", backend=f"dbm:{module}") as store:
            store["k"] = "changed"
    assert path + ".lock" in str(raised.value)
    with pstore.open(path, "r", backend=f"dbm:{module}") as store:
        assert store["k"] == "value"


@root_only
def test_a_sqlite_lock_file_owned_by_another_user_is_refused(tmp_path):
    path = store_in(tmp_path)
    with pstore.open(path, "c", backend="sqlite") as store:
        store["k"] = 1
    os.chown(path + ".lock", 12345, 12345)
    with pytest.raises(UnsafeFileError, match="owned by uid 12345"):
        with pstore.open(path, "w", backend="sqlite") as store:
            store["k"] = 2
    with pstore.open(path, "r", backend="sqlite") as store:
        assert store["k"] == 1


def test_an_unreadable_lock_file_is_a_pstore_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = str(tmp_path / "s.db.lock")
    with open(path, "wb"):
        pass
    os.chmod(path, 0)
    with pytest.raises(UnsafeFileError, match="may not read"):
        FileLock(path, 0.1).fileno()


def test_a_dbm_backend_refuses_a_journal_link_at_open(tmp_path, outside):
    path = store_in(tmp_path)
    filled(path, available_dbm_modules()[-1])
    before = snapshot(str(outside))
    os.symlink(outside / "notes.txt", path + ".journal")
    with pytest.warns(RuntimeWarning, match="symbolic link"):
        backend = DBMBackend(path, "w", lock_timeout=5, fsync=False)
    backend.close()
    assert snapshot(str(outside)) == before
    kept = [name for name in os.listdir(os.path.dirname(path)) if ".journal.damaged-" in name]
    assert len(kept) == 1 and os.path.islink(os.path.join(os.path.dirname(path), kept[0]))


@root_only
def test_root_opening_a_users_store_creates_its_missing_lock_files(tmp_path):
    path = store_in(tmp_path)
    filled(path, "dbm.dumb")
    for name in os.listdir(os.path.dirname(path)):
        os.chown(os.path.join(os.path.dirname(path), name), 12345, 12345)
    os.unlink(path + ".lock")
    with pstore.open(path, "w", backend="dbm") as store:
        store["k"] = "by root"
    with pstore.open(path, "r", backend="dbm") as store:
        assert store["k"] == "by root"


@given(st.dictionaries(st.text(), st.one_of(st.text(), st.integers()), max_size=5))
def test_the_holder_record_is_what_json_dumps_writes(facts):
    # files._json_object spares every writer's first commit the import of json.
    assert _json_object(facts) == json.dumps(facts)
    assert json.loads(_json_object(facts)) == facts
