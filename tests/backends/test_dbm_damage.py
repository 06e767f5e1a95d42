"""DBM damage detected at open: a lost, cut or garbled index, metadata that fails its
digest, a hostile next_oid; gc sweeps the records that exist."""

from __future__ import annotations

import os

import pytest

import pstore
from pstore.backends.dbm import DBMBackend
from pstore.errors import CorruptionError

from .conftest import available_dbm_modules

modules = pytest.mark.parametrize("module", available_dbm_modules())


def filled(tmp_path, module: str = "dbm.dumb", keys: int = 300) -> str:
    path = str(tmp_path / "s.db")
    with pstore.open(path, "c", backend=f"dbm:{module}") as store:
        store.update({f"k{i}": i for i in range(keys)})
    return path


@pytest.mark.parametrize("flag", ["r", "w", "c"])
def test_a_missing_dumb_index_is_damage_not_an_empty_store(tmp_path, flag):
    path = filled(tmp_path)
    os.unlink(path + ".dir")
    size = os.path.getsize(path + ".dat")
    with pytest.raises(CorruptionError, match="index is missing") as raised:
        pstore.open(path, flag, backend="dbm")
    assert raised.value.path == path + ".dir"
    assert os.path.getsize(path + ".dat") == size and not os.path.exists(path + ".dir")


@pytest.mark.parametrize("flag", ["r", "w"])
def test_a_dumb_index_cut_at_a_line_is_damage(tmp_path, flag):
    path = filled(tmp_path)
    with open(path + ".dir", "rb") as file:
        lines = file.readlines()
    with open(path + ".dir", "wb") as file:
        file.writelines(lines[:len(lines) // 2])
    with pytest.raises(CorruptionError, match="entries") as raised:
        pstore.open(path, flag, backend="dbm")
    assert path in str(raised.value)


@pytest.mark.parametrize("flag", ["r", "w"])
def test_a_renamed_dumb_index_entry_is_damage_not_a_lost_key(tmp_path, flag):
    # One byte of a key in the index: the entry count stays right, the key would vanish.
    path = filled(tmp_path)
    with open(path + ".dir", "rb") as file:
        index = file.read()
    position = index.index(b"'k:k17'") + 4
    with open(path + ".dir", "wb") as file:
        file.write(index[:position] + b"j" + index[position + 1:])
    with pytest.raises(CorruptionError, match="renamed") as raised:
        pstore.open(path, flag, backend="dbm")
    assert path in str(raised.value)


def test_a_truncated_dumb_data_file_is_damage_not_deleted_keys(tmp_path):
    # dbm.dumb reads past the end of its data file as short values, b"" among them
    # (pstore's mark of a deleted entry): the file's size is checked at open.
    path = filled(tmp_path)
    size = os.path.getsize(path + ".dat")
    os.truncate(path + ".dat", size // 2)
    with pytest.raises(CorruptionError, match="truncated data file") as raised:
        pstore.open(path, "r", backend="dbm")
    assert raised.value.path == path + ".dat"


@modules
def test_a_key_page_that_fails_its_seal_is_damage_naming_the_page(tmp_path, module):
    path = filled(tmp_path, module)
    backend = DBMBackend(path, "w", lock_timeout=5, fsync=False, variant=module)
    try:
        backend.begin()
        page = backend._get(b"p:0")
        backend._put(b"p:0", page[:5] + bytes([page[5] ^ 0x01]) + page[6:])  # k0 -> k1
        backend.commit()
        with pytest.raises(CorruptionError, match="key page 0 does not match its seal"):
            list(backend.iter_keys())
    finally:
        backend.close()


def test_a_garbled_dumb_index_is_damage_not_a_syntax_error(tmp_path):
    path = filled(tmp_path)
    with open(path + ".dir", "r+b") as file:
        file.seek(30)
        file.write(b"'\x00(")
    with pytest.raises(CorruptionError, match="index cannot be read") as raised:
        pstore.open(path, "r", backend="dbm")
    assert isinstance(raised.value.__cause__, SyntaxError | ValueError)


@modules
def test_metadata_that_fails_its_digest_is_damage(tmp_path, module):
    path = filled(tmp_path, module, keys=3)
    backend = DBMBackend(path, "w", lock_timeout=5, fsync=False, variant=module)
    adapter = backend.database.module
    backend.database.drop_handle()
    db = adapter.open(path, "w")
    db[b"m:keys"] = b"7"   # behind pstore's back
    adapter.sync(db)
    adapter.close(db, path, writable=True)
    backend.close()
    with pytest.raises(CorruptionError, match="digest"):
        pstore.open(path, "r", backend=f"dbm:{module}")


@modules
def test_a_store_without_the_check_key_still_opens(tmp_path, module):
    # Stores written before m:check existed lack it; every new commit adds it.
    path = filled(tmp_path, module, keys=3)
    backend = DBMBackend(path, "w", lock_timeout=5, fsync=False, variant=module)
    backend.begin()
    backend._flush_pages()
    backend.database.changes[b"m:check"] = None
    backend.database.commit()   # the database's own commit: the backend's seals m:check
    with backend._reading():
        assert backend._get(b"m:check") is None
    backend.close()
    with pstore.open(path, "w", backend=f"dbm:{module}") as store:
        assert store["k2"] == 2
        store["k3"] = 3
    backend = DBMBackend(path, "r", lock_timeout=5, fsync=False)
    with backend._reading():
        assert backend._get(b"m:check") is not None
    backend.close()


def rewrite_next_oid(path: str, module: str, value: bytes) -> None:
    backend = DBMBackend(path, "w", lock_timeout=5, fsync=False, variant=module)
    backend.begin()
    backend._put(b"m:next_oid", value)
    backend.commit()    # sealed: only the value is hostile, not the digest
    backend.close()


@modules
def test_gc_with_a_hostile_next_oid_sweeps_the_records_that_exist(tmp_path, module):
    path = filled(tmp_path, module, keys=5)
    backend = DBMBackend(path, "w", lock_timeout=5, fsync=False, variant=module)
    backend.begin()
    backend.put_record(backend.new_oid(), b"unreachable", ())
    backend.commit()
    backend.close()
    rewrite_next_oid(path, module, b"%d" % 10 ** 12)
    with pstore.open(path, "w", backend=f"dbm:{module}") as store:
        assert store.gc() == 1      # would walk 10**12 ids if it swept the id range
        assert store["k4"] == 4


@modules
def test_a_next_oid_set_back_never_overwrites_a_record(tmp_path, module):
    path = filled(tmp_path, module, keys=5)
    rewrite_next_oid(path, module, b"1")
    with pstore.open(path, "w", backend=f"dbm:{module}") as store:
        with pytest.raises(CorruptionError, match="has a record"):
            store["new"] = "value"
        assert store["k0"] == 0
        with pytest.raises(CorruptionError, match="not below"):
            store.gc()
    with pstore.open(path, "r", backend=f"dbm:{module}") as store:
        assert dict(store) == {f"k{i}": i for i in range(5)}


@modules
@pytest.mark.parametrize("value", [b"-5", b"x", b"%d" % 2 ** 64])
def test_a_malformed_next_oid_is_damage_at_open(tmp_path, module, value):
    path = filled(tmp_path, module, keys=2)
    rewrite_next_oid(path, module, value)
    with pytest.raises(CorruptionError, match="m:next_oid"):
        pstore.open(path, "r", backend=f"dbm:{module}")
