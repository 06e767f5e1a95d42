"""What only the DBM backend promises: module choice, format checks, file modes, shelve files."""

from __future__ import annotations

import dbm
import importlib
import os
import shelve
import stat

import pytest

import pstore
from pstore.backends import open_backend
from pstore.backends.dbm import FORMAT_VERSION, DBMBackend
from pstore.backends.dbm_layout import PAGE_SEAL_SIZE, page_key
from pstore.errors import FormatError, ReadOnlyError

from .conftest import available_dbm_modules, fill, snapshot

modules = pytest.mark.parametrize("module", available_dbm_modules())


def open_dbm(path: str, flag: str = "c", module: str | None = None) -> DBMBackend:
    return DBMBackend(path, flag, lock_timeout=5, fsync=False, variant=module)


def fill_dbm(path: str, module: str | None = None) -> None:
    fill(open_dbm(path, module=module))


def data_files(directory: str) -> dict[str, tuple[int, str]]:
    """:func:`snapshot` of the files that may hold data.

    Not SQLite's -wal/-shm: dbm.sqlite3 keeps its file in WAL mode, and reading a
    WAL database creates them (empty of data) if they are missing.
    """
    return snapshot(directory, skip=("-wal", "-shm"))


def test_plain_dbm_uses_the_best_module_and_then_the_one_that_wrote_the_file(tmp_path):
    best = available_dbm_modules()[0]
    fill_dbm(str(tmp_path / "best.db"))
    assert dbm.whichdb(str(tmp_path / "best.db")) == best
    fill_dbm(str(tmp_path / "dumb.db"), "dbm.dumb")
    with pstore.open(str(tmp_path / "dumb.db"), "r", backend="dbm") as store:
        assert "k" in store


def test_variant_errors(tmp_path):
    path = str(tmp_path / "store.db")
    with pytest.raises(ValueError, match="unknown dbm module"):
        open_dbm(path, module="dbm.nope")
    with pytest.raises(ValueError, match="no variants"):
        open_backend("sqlite:x", path, "c", lock_timeout=1, fsync=False)
    fill_dbm(path, "dbm.dumb")
    others = [name for name in available_dbm_modules() if name != "dbm.dumb"]
    for other in others:
        with pytest.raises(FormatError, match="dbm.dumb database"):
            open_dbm(path, module=other)


@modules
@pytest.mark.parametrize("flag", ["r", "w", "c"])
def test_foreign_dbm_database_is_refused_and_left_untouched(tmp_path, module, flag):
    path = str(tmp_path / "foreign.db")
    foreign = importlib.import_module(module).open(path, "c")
    foreign[b"some"] = b"thing"
    foreign.close()
    before = data_files(str(tmp_path))
    with pytest.raises(FormatError) as raised:
        open_dbm(path, flag, module)
    assert path in str(raised.value)
    after = {name: value for name, value in data_files(str(tmp_path)).items()
             if not name.endswith((".lock", ".commits", ".gate"))}
    assert after == before


@pytest.mark.parametrize("flag", ["r", "w", "c"])
def test_not_a_database(tmp_path, flag):
    path = str(tmp_path / "file.db")
    with open(path, "wb") as file:
        file.write(b"not a database\n" * 100)
    with pytest.raises(FormatError):
        open_dbm(path, flag)
    with open(path, "rb") as file:
        assert file.read() == b"not a database\n" * 100


def filled_with_version(path: str, module: str, version: int) -> None:
    """A filled store at ``path`` whose meta key says format ``version``."""
    fill_dbm(path, module)
    backend = open_dbm(path, module=module)
    backend.begin()
    backend._put(b"m:version", b"%d" % version)
    if version < 5:     # key pages had no seal before version 5
        for number in range(backend._get_int(b"m:pages")):
            page = backend._get(page_key(number))
            if page:
                backend._put(page_key(number), page[:-PAGE_SEAL_SIZE])
    backend.commit()
    backend.close()


@modules
def test_newer_format_version_is_refused(tmp_path, module):
    path = str(tmp_path / "store.db")
    filled_with_version(path, module, FORMAT_VERSION + 1)
    for flag in "rwc":
        with pytest.raises(FormatError, match="newer"):
            open_dbm(path, flag, module)


@modules
def test_new_files_are_private(tmp_path, module):
    os.umask(0o022)
    fill_dbm(str(tmp_path / "store.db"), module)
    for name in os.listdir(tmp_path):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name


@modules
def test_read_only_writes_nothing(tmp_path, module):
    path = str(tmp_path / "store.db")
    fill_dbm(path, module)
    before = data_files(str(tmp_path))
    reader = open_dbm(path, "r", module)
    assert reader.get_record(reader.get_key("k")) == b"data"
    assert list(reader.iter_keys()) == ["k"]
    reader.change_marker()
    reader.close()
    assert data_files(str(tmp_path)) == before


def test_key_pages_stay_dense_as_keys_come_and_go(tmp_path):
    backend = open_dbm(str(tmp_path / "store.db"))
    backend.begin()
    oid = backend.new_oid()
    for i in range(2000):
        backend.bind_key(f"k{i}", oid)
    for i in range(2000):
        if i % 4:
            backend.unbind_key(f"k{i}")
    pages_before = backend._get_int(b"m:pages")
    for i in range(1000):
        backend.bind_key(f"new{i}", oid)
    backend.commit()
    assert backend._get_int(b"m:pages") == pages_before   # the sparse pages were refilled
    assert sorted(backend.iter_keys()) == sorted(
        [f"k{i}" for i in range(0, 2000, 4)] + [f"new{i}" for i in range(1000)])
    assert backend.count_keys() == 1500
    backend.close()


@modules
def test_shelve_file_is_read_with_pstores_engine_and_converted(tmp_path, module, monkeypatch):
    source = str(tmp_path / "old.shelf")
    shared = [1, 2]
    with shelve.Shelf(importlib.import_module(module).open(source, "c")) as shelf:
        shelf["config"] = {"a": shared, "b": shared}
        shelf["ünïcode"] = 3
    before = data_files(str(tmp_path))

    def no_stdlib_unpickling(*args, **kwargs):
        raise AssertionError("the standard library's pickle was used")
    monkeypatch.setattr("pickle.loads", no_stdlib_unpickling)
    monkeypatch.setattr("pickle.Unpickler", no_stdlib_unpickling)

    with pstore.open(source, "r", backend="shelve") as store:
        assert sorted(store) == ["config", "ünïcode"] and len(store) == 2
        assert store["config"]["a"] is store["config"]["b"] == [1, 2]
        assert store["ünïcode"] == 3 and "missing" not in store
        with pytest.raises(ReadOnlyError):
            store["x"] = 1
    for flag in "wcn":
        with pytest.raises(ReadOnlyError):
            pstore.open(source, flag, backend="shelve")
    assert data_files(str(tmp_path)) == before

    target = str(tmp_path / "new.db")
    assert pstore.convert_shelve(source, target, batch=1) == 2
    with pstore.open(target, "r") as store:
        assert dict(store) == {"config": {"a": [1, 2], "b": [1, 2]}, "ünïcode": 3}


def test_shelve_backend_refuses_a_pstore_store(tmp_path):
    path = str(tmp_path / "store.db")
    fill_dbm(path)
    with pytest.raises(FormatError, match="backend='dbm'"):
        pstore.open(path, "r", backend="shelve")


def test_journal_round_trip_and_every_cut_or_flipped_byte_is_damage(tmp_path):
    # A journal is renamed into place whole: a cut or flipped one is damaged, not
    # a transaction that never committed.
    from pstore.backends import journal
    from pstore.errors import CorruptionError
    path = str(tmp_path / "journal")
    changes = {b"r:1": b"data" * 10, b"k:\xc3\xa9": b"1 0", b"c:2": None, b"r:3": b""}
    journal.write(path, changes, fsync=True)
    assert journal.read(path, os.getuid()) == changes
    with open(path, "rb") as file:
        content = file.read()
    for cut in range(len(content)):
        with open(path, "wb") as file:
            file.write(content[:cut])
        with pytest.raises(CorruptionError, match="journal"):
            journal.read(path, None)
    for position in range(0, len(content), 7):
        flipped = bytearray(content)
        flipped[position] ^= 0x40
        with open(path, "wb") as file:
            file.write(flipped)
        with pytest.raises(CorruptionError, match=path):
            journal.read(path, None)
    journal.remove(path, fsync=True)
    journal.remove(path, fsync=True)     # no error
    assert journal.read(path, None) is None


@modules
def test_a_version_1_database_is_read_and_upgraded_when_opened_for_writing(tmp_path, module):
    # Version 2 only added keys (l:<oid>) that a version 1 database has none of.
    path = str(tmp_path / "store.db")
    filled_with_version(path, module, 1)
    before = data_files(str(tmp_path))
    backend = open_dbm(path, "r", module)
    assert backend.get_record(backend.get_key("k")) == b"data"
    with backend._reading():
        assert backend._get(b"m:version") == b"1"
    backend.close()
    assert data_files(str(tmp_path)) == before
    open_dbm(path, "w", module).close()
    backend = open_dbm(path, "r", module)
    with backend._reading():
        assert backend._get(b"m:version") == b"%d" % FORMAT_VERSION == b"5"
    assert backend.get_record(backend.get_key("k")) == b"data"
    backend.close()
