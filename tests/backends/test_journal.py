"""Journals a reader can trust: forged, overrunning, bit-flipped and foreign-owned journals
are moved aside and reported, never applied or dropped; a read-only open writes nothing."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pstore
from pstore.backends import journal
from pstore.backends.dbm import DBMBackend
from pstore.errors import CorruptionError

from .conftest import available_dbm_modules

modules = pytest.mark.parametrize("module", available_dbm_modules())


def every_file(folder: str) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (links as links): its bytes and modification time."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            if os.path.islink(full):
                found[full] = (os.readlink(full).encode(), os.lstat(full).st_mtime_ns)
            else:
                with open(full, "rb") as file:
                    found[full] = (file.read(), os.stat(full).st_mtime_ns)
    return found


def filled(tmp_path, module: str) -> str:
    path = str(tmp_path / "s.db")
    with pstore.open(path, "c", backend=f"dbm:{module}") as store:
        store["k0"] = "original"
    return path


def forge(entries: list[tuple[int, bytes, bytes]], *, count: int | None = None) -> bytes:
    """A journal with a correct (unkeyed) SHA-256 trailer: what anyone can write."""
    body = journal.MAGIC + b"".join(struct.pack(">BII", op, len(key), len(value)) + key + value
                                    for op, key, value in entries)
    body += struct.pack(">3sQ", b"END", len(entries) if count is None else count)
    return body + hashlib.sha256(body).digest()


def a_real_journal(path: str, module: str) -> bytes:
    """The journal a commit of {"k0": "rewritten"} writes, captured before it is applied."""
    captured = {}
    original = journal.write

    def capture(where, changes, *, fsync):
        original(where, changes, fsync=fsync)
        with open(where, "rb") as file:
            captured["journal"] = file.read()
        raise _Killed
    journal.write = capture
    try:
        with pytest.raises(_Killed):
            with pstore.open(path, "w", backend=f"dbm:{module}") as store:
                store["k0"] = "rewritten"
    finally:
        journal.write = original
    return captured["journal"]


class _Killed(BaseException):
    """The writer dying right after its commit point."""


@modules
def test_a_read_only_open_reads_a_pending_journal_and_writes_nothing(tmp_path, module):
    path = filled(tmp_path, module)
    a_real_journal(path, module)     # left in place, unapplied: a committed transaction
    assert os.path.exists(path + ".journal")
    before = every_file(str(tmp_path))
    with pstore.open(path, "r", backend=f"dbm:{module}") as store:
        assert store["k0"] == "rewritten"
        assert list(store) == ["k0"]
    assert every_file(str(tmp_path)) == before
    with pstore.open(path, "w", backend=f"dbm:{module}") as store:    # the next writer applies
        assert store["k0"] == "rewritten"
    assert not os.path.exists(path + ".journal")


def plant(path: str, content: bytes) -> None:
    with open(path + ".journal", "wb") as file:
        file.write(content)


def assert_moved_aside(tmp_path, path: str, module: str, content: bytes, reason: str) -> None:
    """A reader ignores the journal (and writes nothing); a writer moves it aside, kept."""
    before = every_file(str(tmp_path))
    with pytest.warns(RuntimeWarning, match=reason):
        with pstore.open(path, "r", backend=f"dbm:{module}") as store:
            assert store["k0"] == "original"
    assert every_file(str(tmp_path)) == before
    with pytest.warns(RuntimeWarning, match="moved aside"):
        with pstore.open(path, "w", backend=f"dbm:{module}") as store:
            assert store["k0"] == "original"
            store["k2"] = "later"
    kept = [name for name in os.listdir(tmp_path) if ".journal.damaged-" in name]
    assert len(kept) == 1
    assert (tmp_path / kept[0]).read_bytes() == content
    backend = DBMBackend(path, "r", lock_timeout=5, fsync=False)
    assert any(kept[0] in problem for problem in backend.problems())
    backend.close()


@modules
def test_a_bit_flipped_journal_is_moved_aside_not_dropped(tmp_path, module):
    path = filled(tmp_path, module)
    content = bytearray(a_real_journal(path, module))
    content[len(journal.MAGIC) + 5] ^= 0x01
    plant(path, bytes(content))
    assert_moved_aside(tmp_path, path, module, bytes(content), "digest does not match")


@modules
def test_a_journal_whose_entries_overrun_its_body_is_refused(tmp_path, module):
    path = filled(tmp_path, module)
    # A correct digest, but the entry claims a value far longer than the body.
    content = forge([(1, b"r:1", b"x")])
    header_at = len(journal.MAGIC)
    content = bytearray(content[:-32])
    content[header_at + 5:header_at + 9] = struct.pack(">I", 10 ** 6)
    content = bytes(content) + hashlib.sha256(content).digest()
    plant(path, content)
    assert_moved_aside(tmp_path, path, module, content, "overruns the body")


@modules
def test_a_journal_whose_count_differs_from_its_trailer_is_refused(tmp_path, module):
    path = filled(tmp_path, module)
    content = forge([(1, b"r:1", b"x")], count=2)
    plant(path, content)
    assert_moved_aside(tmp_path, path, module, content, "trailer says 2")


def test_journal_read_checks_bounds_and_operations(tmp_path):
    path = str(tmp_path / "j")
    for content, reason in [
            (forge([(2, b"k", b"")]), "operation 2"),
            (forge([(0, b"k", b"value")]), "operation 0 with a 5-byte value"),
            (journal.MAGIC + b"END" + bytes(8) + bytes(32), "digest"),
            (b"", "no journal header")]:
        with open(path, "wb") as file:
            file.write(content)
        with pytest.raises(CorruptionError, match=reason) as raised:
            journal.read(path, None)
        assert raised.value.path == path


root_only = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                               reason="changing a file's owner to another user needs root")


@root_only
@modules
def test_a_forged_journal_owned_by_another_user_is_never_applied(tmp_path, module):
    # The trailer is an unkeyed SHA-256: anyone who can write the folder can forge a
    # "complete" journal. Owned by another user than the store, it is refused.
    path = filled(tmp_path, module)
    backend = DBMBackend(path, "r", lock_timeout=5, fsync=False)
    with backend._reading():
        record_key = b"r:%d" % backend._paged_oid(b"k0")
        forged_value = backend._get(record_key).replace(b"original", b"INJECTED")
    backend.close()
    content = forge([(1, record_key, forged_value)])
    plant(path, content)
    os.chown(path + ".journal", 12345, 12345)
    before = every_file(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="owned by uid 12345"):
        with pstore.open(path, "r", backend=f"dbm:{module}") as store:
            assert store["k0"] == "original"
    assert every_file(str(tmp_path)) == before
    with pytest.warns(RuntimeWarning, match="moved aside"):
        with pstore.open(path, "w", backend=f"dbm:{module}") as store:
            assert store["k0"] == "original"
    assert not os.path.exists(path + ".journal")


@modules
def test_a_forged_journal_that_changes_metadata_is_stopped_by_the_meta_digest(tmp_path, module):
    # The journal's own checks pass (a correct SHA-256 trailer, the owner's file); the
    # meta digest it lacks stops it. What remains is in docs/format.md.
    path = filled(tmp_path, module)
    content = forge([(1, b"m:keys", b"99")])
    plant(path, content)
    assert_moved_aside(tmp_path, path, module, content, "m:check")


def test_any_damage_to_a_journal_is_refused_or_harmless(tmp_path):
    path = str(tmp_path / "j")

    @settings(max_examples=300, deadline=None)
    @given(changes=st.dictionaries(st.binary(max_size=12), st.none() | st.binary(max_size=40),
                                   max_size=8),
           position=st.integers(min_value=0), byte=st.integers(0, 255), cut=st.booleans())
    def check(changes, position, byte, cut):
        journal.write(path, changes, fsync=False)
        with open(path, "rb") as file:
            content = bytearray(file.read())
        position %= len(content)
        if cut:
            del content[position:]
        else:
            content[position] = byte
        with open(path, "wb") as file:
            file.write(content)
        try:
            found = journal.read(path, os.getuid())
        except CorruptionError as error:
            assert error.path == path
        else:   # only a change that changed nothing is read back
            assert found == changes and not cut
    check()


@modules
def test_read_only_opens_of_a_store_write_nothing(tmp_path, module):
    path = filled(tmp_path, module)
    with pstore.open(path, "w", backend=f"dbm:{module}") as store:
        store.update({f"k{i}": [i] * i for i in range(1, 600)})
        del store["k5"]
    before = every_file(str(tmp_path))
    with pstore.open(path, "r", backend=f"dbm:{module}") as store:
        assert len(store) == 599 and store["k7"] == [7] * 7
        assert sorted(store) == sorted(["k0", *(f"k{i}" for i in range(1, 600) if i != 5)])
        assert dict(store.items())["k0"] == "original"
    assert every_file(str(tmp_path)) == before
