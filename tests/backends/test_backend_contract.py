"""The Backend contract (pstore/backends/base.py), run against every backend."""

from __future__ import annotations

import os

import pytest

from pstore.backends.blobs import BlobStore, blob_digest
from pstore.errors import ClosedError, FormatError, LockTimeoutError, ReadOnlyError


def write(backend, fn):
    backend.begin()
    try:
        result = fn()
    except BaseException:
        backend.rollback()
        raise
    backend.commit()
    return result


def test_records_round_trip(backend):
    oid = write(backend, lambda: backend.new_oid())
    assert oid > 0
    assert backend.get_record(oid) is None

    def put():
        backend.put_record(oid, b"\x00data", ())
    write(backend, put)
    assert backend.get_record(oid) == b"\x00data"
    write(backend, lambda: backend.put_record(oid, b"new", ()))
    assert backend.get_record(oid) == b"new"
    write(backend, lambda: backend.delete_record(oid))
    assert backend.get_record(oid) is None
    write(backend, lambda: backend.delete_record(oid))   # no error


def test_new_oids_are_distinct_and_never_reused(backend):
    def make_two():
        first, second = backend.new_oid(), backend.new_oid()
        backend.put_record(first, b"a", ())
        backend.put_record(second, b"b", ())
        return first, second
    first, second = write(backend, make_two)
    assert first != second
    write(backend, lambda: backend.gc())   # no key: both are garbage
    assert backend.get_record(first) is None
    third = write(backend, lambda: (backend.put_record(oid := backend.new_oid(), b"c", ()), oid)[1])
    assert third not in (first, second)


def test_reserve_ids_moves_the_allocation_past_them(opener):
    first = opener()
    write(first, lambda: first.new_oid())      # it holds a block of ids (SQLite, PostgreSQL)
    write(first, lambda: first.reserve_ids(50_000))
    later = opener()
    assert write(later, lambda: later.new_oid()) > 50_000
    mine = write(first, lambda: first.new_oid())
    assert mine > 50_000
    write(first, lambda: first.reserve_ids(10))  # below: changes nothing
    assert write(first, lambda: first.new_oid()) > mine
    for wrong in (-1, 2 ** 63 - 1):
        with pytest.raises(ValueError, match="cannot reserve object ids"):
            write(first, lambda wrong=wrong: first.reserve_ids(wrong))


def test_keys(backend):
    def setup():
        oid = backend.new_oid()
        backend.put_record(oid, b"x", ())
        backend.bind_key("a", oid)
        backend.bind_key("b", oid)
        return oid
    oid = write(backend, setup)
    assert backend.get_key("a") == backend.get_key("b") == oid
    assert backend.get_key("missing") is None
    assert backend.get_item("a") == (oid, b"x") and backend.get_item("missing") is None
    assert backend.count_keys() == 2
    assert sorted(backend.iter_keys()) == ["a", "b"]
    assert sorted(backend.iter_items()) == [("a", oid, b"x"), ("b", oid, b"x")]
    assert write(backend, lambda: backend.bind_key("b", oid)) == oid
    assert write(backend, lambda: backend.bind_key("c", oid)) is None
    assert write(backend, lambda: backend.unbind_key("c")) == oid
    assert write(backend, lambda: backend.unbind_key("a")) == oid
    assert write(backend, lambda: backend.unbind_key("a")) is None
    assert list(backend.iter_keys()) == ["b"]


def test_bind_keys_binds_many_and_returns_the_ids_released(backend):
    # More keys than one statement binds (SQLite: 500), new and bound ones interleaved.
    first = write(backend, lambda: {f"k{i:04}": backend.new_oid() for i in range(1200)})
    assert write(backend, lambda: backend.bind_keys(list(first.items()))) == set()

    def rebind():
        bindings, released = [], set()
        for i in range(1200):
            key = f"k{i:04}"
            if i % 3 == 1:      # rebound to another id: its old one is released
                bindings.append((key, backend.new_oid()))
                released.add(first[key])
            elif i % 3 == 2:    # bound again to the same id: nothing released
                bindings.append((key, first[key]))
            bindings.append((f"new{i:04}", first[key]))     # a new key of an existing id
        return bindings, released
    bindings, released = write(backend, rebind)
    assert write(backend, lambda: backend.bind_keys(bindings)) == released
    expected = {**first, **dict(bindings)}
    assert backend.count_keys() == len(expected) == 2400
    assert {key: backend.get_key(key) for key in expected} == expected
    # New keys again, after a batch that found bound ones.
    last = write(backend, lambda: [(f"z{i}", backend.new_oid()) for i in range(600)])
    assert write(backend, lambda: backend.bind_keys(last)) == set()
    assert all(backend.get_key(key) == oid for key, oid in last)


def test_bind_keys_is_undone_by_a_rollback(backend):
    oid = write(backend, lambda: backend.new_oid())
    write(backend, lambda: backend.bind_keys([("kept", oid)]))
    backend.begin()
    other = backend.new_oid()
    assert backend.bind_keys([("kept", other), ("gone", other)]) == {oid}
    assert backend.get_key("kept") == other and backend.get_key("gone") == other
    backend.rollback()
    assert backend.get_key("kept") == oid and backend.get_key("gone") is None


def test_bindings_read_in_a_transaction_then_changed(opener):
    # A backend may keep what its write transaction read of keys (no one else binds keys
    # while it holds the lock): the answers stay right through its own changes, a
    # rollback, and another connection's commit between two transactions.
    backend, other = opener(), opener()
    a, b, c, d = write(backend, lambda: [backend.new_oid() for _ in range(4)])
    write(backend, lambda: backend.bind_keys([("k", a)]))
    backend.begin()
    assert backend.get_item("k") == (a, None) and backend.get_item("missing") is None
    assert backend.get_key("k") == a and backend.get_key("missing") is None
    assert backend.bind_keys([("k", b), ("missing", c)]) == {a}
    assert backend.get_key("k") == b and backend.get_key("missing") == c
    assert backend.unbind_key("k") == b and backend.unbind_key("k") is None
    assert backend.bind_key("k", d) is None
    assert backend.bind_keys([("k", d)]) == set()
    backend.rollback()
    assert backend.get_key("k") == a and backend.get_key("missing") is None

    backend.begin()
    assert backend.get_key("k") == a
    backend.commit()
    write(other, lambda: other.bind_keys([("k", b)]))     # between two of backend's
    backend.begin()
    assert backend.bind_keys([("k", c)]) == {b}
    assert backend.unbind_key("k") == c
    backend.commit()
    assert other.get_key("k") is None and other.get_key("missing") is None


def test_iter_keys_streams_more_than_one_batch(backend):
    keys = [f"k{i:05}" for i in range(2500)]

    def setup():
        oid = backend.new_oid()
        backend.put_record(oid, b"x", ())
        for key in keys:
            backend.bind_key(key, oid)
    write(backend, setup)
    assert sorted(backend.iter_keys()) == keys
    assert [key for key, _, _ in backend.iter_items()] == keys
    assert backend.count_keys() == len(keys)


def test_references(backend):
    def setup():
        a, b, c = (backend.new_oid() for _ in range(3))
        backend.put_record(c, b"c", ())
        backend.put_record(b, b"b", [c])
        backend.put_record(a, b"a", [b])
        backend.bind_key("a", a)
        return a, b, c
    a, b, c = write(backend, setup)
    assert backend.is_referenced(a) and backend.is_referenced(b) and backend.is_referenced(c)
    assert backend.reaches([a], c) and backend.reaches([b], c) and backend.reaches([c], c)
    assert not backend.reaches([c], a)
    assert backend.existing([a, c, 10**9]) == {a, c}
    assert backend.existing([]) == set()
    # Replacing a record's refs drops the old ones.
    write(backend, lambda: backend.put_record(b, b"b2", ()))
    assert not backend.is_referenced(c)
    assert not backend.reaches([a], c)


def test_lazy_refs_keep_records_alive_but_are_not_followed_by_reaches(backend):
    def setup():
        a, b, c = (backend.new_oid() for _ in range(3))
        backend.put_record(c, b"c", ())
        backend.put_record(a, b"a", ())
        backend.put_record(b, b"b", [a, c], lazy_refs=[a, c])     # b -> a, c lazily
        backend.put_record(a, b"a", [b])                          # a -> b: a cycle through b
        backend.bind_key("a", a)
        return a, b, c
    a, b, c = write(backend, setup)
    assert backend.reaches([a], b) and not backend.reaches([b], a)
    assert not backend.reaches([a], c) and backend.is_referenced(c)
    assert write(backend, backend.gc) == 0
    write(backend, lambda: backend.put_record(b, b"b2", [a]))     # now eager, and c dropped
    assert backend.reaches([b], a) and backend.reaches([a], a) and not backend.is_referenced(c)
    write(backend, lambda: backend.put_record(b, b"b3", [a], lazy_refs=[a]))
    assert not backend.reaches([b], a)
    assert write(backend, backend.gc) == 1 and backend.get_record(c) is None
    write(backend, lambda: backend.delete_record(b))
    assert not backend.reaches([b], a) and backend.get_record(b) is None


def test_gc_frees_exactly_the_unreachable(backend):
    def setup():
        ids = {name: backend.new_oid() for name in "abcdexy"}
        # a -> b -> c (shared by d); e unbound but refers to c; x <-> y is an unreachable cycle.
        backend.put_record(ids["c"], b"c", ())
        backend.put_record(ids["b"], b"b", [ids["c"]])
        backend.put_record(ids["a"], b"a", [ids["b"]])
        backend.put_record(ids["d"], b"d", [ids["c"]])
        backend.put_record(ids["e"], b"e", [ids["c"]])
        backend.put_record(ids["x"], b"x", [ids["y"]])
        backend.put_record(ids["y"], b"y", [ids["x"]])
        backend.bind_key("a", ids["a"])
        backend.bind_key("d", ids["d"])
        return ids
    ids = write(backend, setup)
    assert write(backend, backend.gc) == 3
    for name in "abcd":
        assert backend.get_record(ids[name]) == name.encode()
    for name in "exy":
        assert backend.get_record(ids[name]) is None
    assert write(backend, backend.gc) == 0


def test_rollback_discards_everything(backend):
    def setup():
        oid = backend.new_oid()
        backend.put_record(oid, b"x", ())
        backend.bind_key("k", oid)
        return oid
    oid = write(backend, setup)
    backend.begin()
    backend.put_record(oid, b"changed", ())
    backend.unbind_key("k")
    backend.put_record(backend.new_oid(), b"new", ())
    backend.rollback()
    assert backend.get_record(oid) == b"x"
    assert backend.get_key("k") == oid
    assert backend.count_keys() == 1


def test_change_marker_moves_when_another_connection_commits(opener, backend):
    other = opener()
    before = backend.change_marker()
    write(other, lambda: other.bind_key("k", other.new_oid()))
    after = backend.change_marker()
    assert after != before
    assert backend.change_marker() == after
    assert backend.get_key("k") is not None


def test_one_writer_at_a_time(opener, backend):
    other = opener(lock_timeout=0.2)
    backend.begin()
    try:
        with pytest.raises(LockTimeoutError) as raised:
            other.begin()
        assert raised.value.path == backend.path and raised.value.timeout == 0.2
        assert backend.path in str(raised.value)
    finally:
        backend.rollback()
    other.begin()   # free again
    other.rollback()


def test_readers_are_not_blocked_by_a_writer(opener, backend):
    oid = write(backend, lambda: (backend.bind_key("k", o := backend.new_oid()),
                                  backend.put_record(o, b"old", ()), o)[2])
    reader = opener("r")
    backend.begin()
    backend.put_record(oid, b"new", ())
    assert reader.get_record(oid) == b"old"     # uncommitted write invisible, no wait
    backend.commit()
    assert reader.get_record(oid) == b"new"


def test_read_only_backend_refuses_to_begin(opener, backend):
    write(backend, lambda: backend.bind_key("k", backend.new_oid()))
    reader = opener("r")
    with pytest.raises(ReadOnlyError):
        reader.begin()
    assert reader.get_key("k") is not None


def test_missing_file_with_r_or_w(opener):
    for flag in "rw":
        with pytest.raises(FileNotFoundError):
            opener(flag)


def test_flag_n_starts_empty(opener, backend):
    write(backend, lambda: backend.bind_key("k", backend.new_oid()))
    backend.close()
    fresh = opener("n")
    assert fresh.count_keys() == 0


def test_close_is_idempotent_and_rolls_back(opener, backend):
    backend.begin()
    backend.bind_key("k", backend.new_oid())
    backend.close()
    backend.close()
    again = opener("w", lock_timeout=0.5)
    assert again.get_key("k") is None
    again.begin()   # the lock was released by close()
    again.rollback()


def test_blobs_of_a_closed_backend_say_it_is_closed(backend):
    name = write(backend, lambda: backend.put_blob([b"a blob"]))
    backend.close()
    for operation, call in {
            "get_blob": lambda: backend.get_blob(name, 6, writable=False),
            "read_blob": lambda: list(backend.read_blob(name)),
            "put_blob": lambda: backend.put_blob([b"more"])}.items():
        with pytest.raises(ClosedError, match="is closed"):
            call()
            pytest.fail(f"{operation} ran on a closed backend")


def test_reads_inside_a_transaction_see_its_own_changes(backend):
    def setup():
        oid = backend.new_oid()
        backend.put_record(oid, b"old", ())
        backend.bind_key("old", oid)
        return oid
    old = write(backend, setup)
    backend.begin()
    try:
        new = backend.new_oid()
        backend.put_record(new, b"new", [old])
        backend.bind_key("new", new)
        backend.unbind_key("old")
        assert backend.get_record(new) == b"new"
        assert backend.get_key("new") == new and backend.get_key("old") is None
        assert backend.get_item("new") == (new, b"new")
        assert list(backend.iter_keys()) == ["new"]
        assert list(backend.iter_items()) == [("new", new, b"new")]
        assert backend.count_keys() == 1
        assert backend.existing([old, new]) == {old, new}
        assert backend.is_referenced(old) and backend.reaches([new], old)
        backend.delete_record(new)
        assert backend.get_record(new) is None and backend.existing([new]) == set()
    finally:
        backend.rollback()
    assert backend.get_key("old") == old and backend.get_key("new") is None


# -- blobs ----------------------------------------------------------------------------------

def blob_folder(backend) -> BlobStore:
    """The blob files of a backend that keeps them on this machine, read on their own."""
    return BlobStore(backend.path + ".blobs")


def blob_files(backend) -> set[str]:
    return set(blob_folder(backend).names())


def test_blobs_are_named_by_content_and_stored_once(backend):
    data = bytes(range(256)) * 1000
    first = write(backend, lambda: backend.put_blob([data]))
    # The same bytes in other chunks: the same name, still one file.
    second = write(backend, lambda: backend.put_blob([data[:1000], memoryview(data)[1000:]]))
    assert first == second == blob_digest(data)     # BLAKE3 (format version 4)
    assert blob_files(backend) == {first}
    other = write(backend, lambda: backend.put_blob([data[:-1]]))
    assert other != first
    mapped = backend.get_blob(first, len(data), writable=True)
    assert bytes(mapped) == data
    mapped[0] = 255     # copy-on-write: the blob itself is unchanged
    assert bytes(backend.get_blob(first, len(data), writable=False)) == data
    assert b"".join(backend.read_blob(first)) == data


def test_a_rolled_back_blob_leaves_nothing(backend):
    kept = write(backend, lambda: backend.put_blob([b"kept" * 100]))
    backend.begin()
    backend.put_blob([b"dropped" * 100])
    backend.put_blob([b"kept" * 100])   # existed before the transaction: stays
    backend.rollback()
    assert blob_files(backend) == {kept}
    assert not [name for name in os.listdir(blob_folder(backend).directory)
                if name.startswith(".tmp")]


def test_a_missing_or_wrong_sized_blob_is_a_format_error(backend):
    name = write(backend, lambda: backend.put_blob([b"x" * 100]))
    with pytest.raises(FormatError, match="holds 100 bytes"):
        backend.get_blob(name, 99, writable=False)
    os.unlink(blob_folder(backend).path_of(name))
    with pytest.raises(FormatError, match=f"blob file .*{name} is missing"):
        backend.get_blob(name, 100, writable=False)


def test_gc_deletes_the_blobs_no_live_record_names(backend):
    def setup():
        names = [backend.put_blob([bytes([i]) * 1000]) for i in range(3)]
        live, dead = backend.new_oid(), backend.new_oid()
        backend.put_record(live, b"live", (), blobs=names[:2])
        backend.put_record(dead, b"dead", (), blobs=names[1:])
        backend.bind_key("live", live)
        return names
    names = write(backend, setup)
    assert blob_files(backend) == set(names)
    assert write(backend, backend.gc) == 1
    assert blob_files(backend) == set(names[:2])
    # Rewriting the live record without blobs lets gc free them too.
    write(backend, lambda: backend.put_record(backend.get_key("live"), b"live", ()))
    write(backend, backend.gc)
    assert blob_files(backend) == set()


def test_put_records_writes_as_put_record_does_one_at_a_time(backend):
    from pstore.backends.base import RecordWrite

    def setup():
        a, b, c = (backend.new_oid() for _ in range(3))
        backend.put_records([RecordWrite(c, b"c", (), (), ()), RecordWrite(a, b"a", (), (), ())])
        backend.bind_key("a", a)
        backend.bind_key("c", c)
        return a, b, c
    a, b, c = write(backend, setup)
    # In a later transaction: a is rewritten (its refs replaced), b is new, refs of both kinds.
    write(backend, lambda: backend.put_records([
        RecordWrite(b, b"b", [a, c], [c], ()),      # b -> a, and c lazily
        RecordWrite(a, b"a2", [b], (), ()),         # a -> b
    ]))
    assert [backend.get_record(oid) for oid in (a, b, c)] == [b"a2", b"b", b"c"]
    assert sorted(backend.refs_of(b)) == sorted([a, c]) and list(backend.refs_of(a)) == [b]
    assert backend.reaches([a], a) and not backend.reaches([a], c) and backend.is_referenced(c)
    write(backend, lambda: backend.put_records([RecordWrite(a, b"a3", (), (), ())]))
    assert list(backend.refs_of(a)) == [] and not backend.reaches([a], b)
    write(backend, lambda: backend.put_records([]))     # nothing: no error
    assert backend.get_record(a) == b"a3"
