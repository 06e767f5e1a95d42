"""Damage is always detected: flipped bits, zeroed or random blocks and truncations of
each file of a closed store end in the value as written or a CorruptionError naming the
path and the key -- never a different value, never a foreign exception.

``PSTORE_DAMAGE_TRIALS`` sets the number of trials per backend (default 150).
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3

import numpy as np
import pytest

import pstore
from pstore.store import records
from pstore.store.signing import signer_for

TRIALS = int(os.environ.get("PSTORE_DAMAGE_TRIALS", "150"))
# Files the damage goes to: the store's own, not its lock or change-marker files.
_SKIPPED_SUFFIXES = (".lock", ".commits", ".gate")


def _values() -> dict[str, object]:
    shared = ["shared", 1, 2.5]
    values: dict[str, object] = {f"int{i}": i * 7919 for i in range(10)}
    values.update({f"text{i}": f"value {i} " * (i * 20) for i in range(8)})
    values.update({f"list{i}": [shared, i, {"n": i, "t": (i, str(i))}] for i in range(6)})
    values["shared"] = shared
    values["array"] = np.arange(20_000, dtype=np.int64)   # a blob
    values["nested"] = {"a": {"b": [bytes(range(256))] * 3}}
    # Persistent objects: a record of two pickles, loaded lazily through a placeholder.
    values["persistent"] = pstore.PersistentDict({"items": list(range(50))})
    values["holder"] = {"p": values["persistent"], "n": 5}
    return values


def _equal(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):     # a PersistentDict's loads as itself
        return (type(a) is type(b) and a.keys() == b.keys()
                and all(_equal(a[key], b[key]) for key in a))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                and a.dtype == b.dtype and np.array_equal(a, b))
    return type(a) is type(b) and a == b


def _store_files(directory: str) -> list[str]:
    found = []
    for root, _, names in os.walk(directory):
        found += [os.path.join(root, name) for name in names
                  if not name.endswith(_SKIPPED_SUFFIXES)]
    return sorted(found)


def _damage(file: str, rng: random.Random) -> str:
    """Damage ``file`` one of four ways; return how, for the failure message."""
    size = os.path.getsize(file)
    with open(file, "r+b") as handle:
        content = bytearray(handle.read())
        kind = rng.choice(["flip", "flip", "zero", "random", "truncate"])
        if kind == "truncate" or not size:
            cut = rng.randrange(size) if size else 0
            handle.truncate(cut)
            return f"truncated {file} to {cut} of {size} bytes"
        if kind == "flip":
            positions = [rng.randrange(size) for _ in range(rng.randint(1, 3))]
            for position in positions:
                content[position] ^= 1 << rng.randrange(8)
            how = f"flipped bits at {positions} of {file}"
        else:
            start = rng.randrange(size)
            length = min(rng.choice([1, 16, 512, 4096]), size - start)
            block = bytes(length) if kind == "zero" else rng.randbytes(length)
            content[start:start + length] = block
            how = f"{kind} block at {start}+{length} of {file}"
        handle.seek(0)
        handle.write(content)
        return how


def _read_all(path: str, backend: str, expected: dict[str, object]) -> list[str]:
    """Read every key of the damaged store; return what broke the rules (empty: none)."""
    broken: list[str] = []
    detected = False
    try:
        store = pstore.open(path, "r", backend=backend)
    except (pstore.FormatError, pstore.CorruptionError) as error:
        # Too damaged to be recognised as a store: refused at open, naming the file.
        return [] if path in str(error) else [f"open: {error!r} does not name {path}"]
    except Exception as error:
        return [f"open: foreign {error!r}"]
    with store:
        try:
            found = set(store)
        except pstore.CorruptionError as error:
            detected = True
            found = set()
            if path not in str(error):
                broken.append(f"iteration: {error} does not name the path")
        except Exception as error:
            return [f"iteration: foreign {error!r}"]
        missing = []
        for key in sorted(found | expected.keys()):
            try:
                value = store[key]
            except pstore.CorruptionError as error:
                detected = True
                if path not in str(error) or error.key != key:
                    broken.append(f"{key!r}: {error} does not name path and key")
                continue
            except KeyError as error:
                if error.args == (key,) and type(error) is KeyError:
                    missing.append(key)
                    continue
                broken.append(f"{key!r}: foreign {error!r}")
                continue
            except Exception as error:
                broken.append(f"{key!r}: foreign {error!r}")
                continue
            if key not in expected:
                broken.append(f"{key!r}: a key never written loads as {value!r}")
                continue
            try:
                equal = _equal(value, expected[key])
            except pstore.CorruptionError as error:
                # A Persistent object loads its state when first used: its error names
                # the object id (the key that led to it is not known then).
                detected = True
                if path not in str(error) or error.object_id is None:
                    broken.append(f"{key!r}: {error} does not name path and object id")
                continue
            except Exception as error:
                broken.append(f"{key!r}: foreign {error!r} when used")
                continue
            if not equal:
                broken.append(f"{key!r}: a different value {value!r}")
        if missing and not detected:
            broken.append(f"keys {missing} vanished, and no error said the store is damaged")
    return broken


def _run_trials(tmp_path, backend: str, compression: str | None) -> list[str]:
    original = tmp_path / "original"
    original.mkdir()
    path = str(original / "store.db")
    expected = _values()
    with pstore.open(path, "c", backend=backend, compression=compression) as store:
        store.update(expected)
    files = _store_files(str(original))
    blobs = {file.replace(str(original), str(tmp_path / f"trial{trial}"))
             for file in files if ".blobs" in file for trial in range(TRIALS)}
    rng = random.Random(f"{backend} {compression}")
    failures = []
    for trial in range(TRIALS):
        copy = tmp_path / f"trial{trial}"
        shutil.copytree(original, copy)
        target = rng.choice(files).replace(str(original), str(copy))
        how = _damage(target, rng)
        broken = _read_all(str(copy / "store.db"), backend, expected)
        if target in blobs and broken and all("'array': a different value" in problem
                                              for problem in broken):
            # A mapped blob is data, not hashed at each load (that would cost reading it
            # all): verify() is what finds it changed.
            with pstore.open(str(copy / "store.db"), "r", backend=backend) as store:
                report = store.verify()
            broken = [] if any(problem.blob for problem in report.problems) else [
                f"verify() missed the damaged blob: {report}"]
        if broken:
            failures.append(f"{how}: {broken}")
        shutil.rmtree(copy)
    return failures


@pytest.mark.parametrize("backend, compression", [("sqlite", None), ("sqlite", "zlib"),
                                                  ("dbm", None)])
def test_damage_is_detected_or_harmless(tmp_path, backend, compression):
    failures = _run_trials(tmp_path, backend, compression)
    assert not failures, f"{len(failures)} of {TRIALS} trials:\n" + "\n".join(failures[:20])


# -- the pieces, one by one -------------------------------------------------------------------


@pytest.fixture
def sqlite_store(tmp_path):
    path = str(tmp_path / "store.db")
    with pstore.open(path) as store:
        store["a"] = {"value": 1}
        store["b"] = [store["a"], "two"]
    return path


def _records(path: str) -> dict[int, bytes]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT oid, data FROM records"))


def test_a_flipped_record_byte_names_key_and_object_id_with_the_cause(sqlite_store):
    data = _records(sqlite_store)
    oid = min(data)
    damaged = bytearray(data[oid])
    damaged[len(damaged) // 2] ^= 1
    with sqlite3.connect(sqlite_store) as conn:
        conn.execute("UPDATE records SET data = ? WHERE oid = ?", (bytes(damaged), oid))
    with pstore.open(sqlite_store, "r") as store:
        with pytest.raises(pstore.CorruptionError) as raised:
            store["a"]
        assert (raised.value.key, raised.value.object_id) == ("a", oid)
        assert sqlite_store in str(raised.value) and "digest" in str(raised.value)
        assert isinstance(raised.value.__cause__, ValueError)
        # b refers to a: its error names the key asked for and the damaged record.
        with pytest.raises(pstore.CorruptionError) as raised:
            store["b"]
        assert (raised.value.key, raised.value.object_id) == ("b", oid)
        report = store.verify()
    assert not report.ok
    assert [(problem.object_id, "digest" in problem.what) for problem in report.problems] == [
        (oid, True)]


def test_a_record_moved_to_another_object_id_does_not_verify(sqlite_store):
    data = _records(sqlite_store)
    first, second = sorted(data)
    with sqlite3.connect(sqlite_store) as conn:
        conn.execute("UPDATE records SET data = ? WHERE oid = ?", (data[first], second))
    with pstore.open(sqlite_store, "r") as store, pytest.raises(pstore.CorruptionError):
        store["b"]


def test_a_key_rebound_behind_pstores_back_is_refused(sqlite_store):
    with sqlite3.connect(sqlite_store) as conn:
        conn.execute("UPDATE keys SET oid = (SELECT oid FROM keys WHERE key = 'b')"
                     " WHERE key = 'a'")
    with pstore.open(sqlite_store, "r") as store:
        with pytest.raises(pstore.CorruptionError, match="seal") as raised:
            store["a"]
        assert raised.value.key == "a"
        assert store["b"][1] == "two"
        with pytest.raises(pstore.CorruptionError, match="key 'a'"):
            list(store.items())
        assert [problem.key for problem in store.verify().problems] == ["a"]


def test_a_dbm_key_rebound_behind_pstores_back_is_refused(tmp_path):
    path = str(tmp_path / "store.db")
    with pstore.open(path, backend="dbm") as store:
        store["a"] = 1
        store["b"] = 2
        backend = store._backend
        backend.begin()
        value = backend._get(b"k:a").split()
        backend._put(b"k:a", b" ".join([b"%d" % backend.get_key("b"), *value[1:]]))
        backend.commit()
    with pstore.open(path, "r", backend="dbm") as store:
        with pytest.raises(pstore.CorruptionError, match="seal") as raised:
            store["a"]
        assert raised.value.key == "a"
        assert store["b"] == 2


class Fails:
    def __init__(self) -> None:
        self.state = 1      # so that unpickling calls __setstate__

    def __setstate__(self, state):
        raise RuntimeError("the user's __setstate__ failed")


def test_an_error_of_user_code_keeps_its_type_and_gets_a_note(tmp_path):
    path = str(tmp_path / "store.db")
    with pstore.open(path) as store:
        store["x"] = Fails()
        oid = store._backend.get_key("x")
    with pstore.open(path, "r") as store, pytest.raises(RuntimeError,
                                                         match="__setstate__ failed") as raised:
        store["x"]
    [note] = [note for note in raised.value.__notes__ if note.startswith("pstore:")]
    assert f"object id {oid}" in note and "key 'x'" in note and path in note


def test_a_missing_class_keeps_its_type_and_names_the_key(tmp_path):
    path = str(tmp_path / "store.db")
    with pstore.open(path) as store:
        store["x"] = Fails()
        oid = store._backend.get_key("x")
    with sqlite3.connect(path) as conn:
        [(data,)] = conn.execute("SELECT data FROM records WHERE oid = ?", (oid,))
        payload = records.unpack(data, oid).payload.replace(b"Fails", b"Gone!")
        # Signed with the user's key: the user's own record, loaded with full semantics.
        conn.execute("UPDATE records SET data = ? WHERE oid = ?",
                     (records.pack(oid, payload, [], 0, signer_for(None)), oid))
    with pstore.open(path, "r") as store, pytest.raises(AttributeError) as raised:
        store["x"]
    # Still an AttributeError: a MissingClassError naming key, object id and the class.
    assert isinstance(raised.value, pstore.MissingClassError)
    assert (raised.value.key, raised.value.object_id) == ("x", oid)
    assert raised.value.global_name.endswith(".Gone!")
    assert "key 'x'" in str(raised.value) and f"object id {oid}" in str(raised.value)


def test_a_malformed_sqlite_page_is_a_corruption_error(tmp_path):
    path = str(tmp_path / "store.db")
    with pstore.open(path) as store:
        store.update({f"k{i}": "x" * 300 for i in range(200)})
    with open(path, "r+b") as file:     # zero every page but the first two
        file.seek(2 * 4096)
        file.write(bytes(os.path.getsize(path) - 2 * 4096))
    with pstore.open(path, "r") as store, pytest.raises(pstore.CorruptionError) as raised:
        [store[f"k{i}"] for i in range(200)]
    assert path in str(raised.value)
    assert isinstance(raised.value.__cause__, sqlite3.DatabaseError)


def test_verify_of_a_sound_store_is_ok_and_finds_a_damaged_blob(tmp_path):
    path = str(tmp_path / "store.db")
    with pstore.open(path) as store:
        store["array"] = np.arange(100_000)
        store["compressed"] = "text " * 1000
        report = store.verify()
        assert report.ok, str(report)
        assert (report.records, report.keys, report.blobs, report.unverified) == (2, 2, 1, 0)
    [blob] = [os.path.join(root, name) for root, _, names in os.walk(path + ".blobs")
              for name in names]
    with open(blob, "r+b") as file:
        file.seek(1000)
        file.write(b"\x01")
    with pstore.open(path, "r") as store:
        report = store.verify()
    assert not report.ok
    [problem] = report.problems
    assert problem.blob == os.path.basename(blob) and "digest" in problem.what
    assert problem.object_id is not None and os.path.basename(blob) in str(report)


def test_a_corruption_error_pickles(tmp_path):
    import pickle
    error = pstore.CorruptionError("p.db", "a bad digest", key="k", object_id=7)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.key, copy.object_id) == (
        pstore.CorruptionError, str(error), "k", 7)
    assert isinstance(copy, ValueError) and isinstance(copy, pstore.Error)


def test_verify_on_dbm_finds_a_damaged_record_and_counts_what_it_checked(tmp_path):
    path = str(tmp_path / "store.db")
    with pstore.open(path, backend="dbm") as store:
        store["a"] = {"value": 1}
        store["b"] = [store["a"], "two"]
        assert store.verify().ok
        backend = store._backend
        oid = backend.get_key("a")
        data = bytearray(backend.get_record(oid))
        data[-1] ^= 0x10
        backend.begin()
        backend._put(b"r:%d" % oid, bytes(data))
        backend.commit()
    with pstore.open(path, "r", backend="dbm") as store:
        report = store.verify()
        assert "a" in store and len(store) == 2
        with pytest.raises(pstore.CorruptionError, match="key 'b'"):
            store["b"]
    assert (report.records, report.keys, report.ok) == (2, 2, False)
    assert [problem.object_id for problem in report.problems] == [oid]


def test_an_upgraded_version_2_store_reads_old_records_and_digests_new_ones(tmp_path):
    path = str(tmp_path / "store.db")
    with pstore.open(path) as store:
        store["old"] = [1, 2]
    with sqlite3.connect(path) as conn:     # make it what version 2 wrote
        [(oid, data)] = conn.execute("SELECT oid, data FROM records")
        conn.execute("UPDATE records SET data = ?", (records.unpack(data, oid).payload,))
        conn.execute("ALTER TABLE keys DROP COLUMN seal")
        conn.execute("DELETE FROM meta WHERE name = 'digests_from'")
        conn.execute("UPDATE meta SET value = 2 WHERE name = 'version'")
    with pstore.open(path, "r") as store:
        assert store["old"] == [1, 2]
        assert store.verify().unverified == 1
    with pstore.open(path, "w") as store:
        assert store["old"] == [1, 2]
        store["new"] = [3]
        report = store.verify()
    assert (report.ok, report.records, report.unverified) == (True, 2, 1)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE name = 'version'").fetchone() == (5,)
        digests_from = conn.execute(
            "SELECT value FROM meta WHERE name = 'digests_from'").fetchone()[0]
        new_oid = conn.execute("SELECT oid FROM keys WHERE key = 'new'").fetchone()[0]
        old_data = conn.execute("SELECT data FROM records WHERE oid = ?", (oid,)).fetchone()[0]
    assert oid < digests_from <= new_oid
    # The old record has no digest: a change to it is not caught by one.
    assert old_data[:1] != records.ENVELOPE
