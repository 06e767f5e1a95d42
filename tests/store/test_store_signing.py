"""Safe by default (issue 13, store side): signed records load fully, everything else
restricted; IntegrityError for a changed record of one's own; globals, trust, allow=.

Two users are two keys: ALICE's is the session's key file (tests/conftest.py), BOB's is
given as ``key=``. Hostile records are never loaded with full semantics here: an audit
hook records every os.system, subprocess.Popen and exec while a test loads them.
"""

from __future__ import annotations

import copyreg
import importlib
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import pstore
from pstore.store import records
from pstore.store.signing import signer_for

from .objects import Config, Node, Shell

BOB = b"b" * 32
_WATCHED = {"os.system", "subprocess.Popen", "exec", "os.exec", "os.posix_spawn", "os.spawn"}
_events: list[tuple[str, tuple]] = []
_watching = False


def _audit(event: str, args: tuple) -> None:
    if _watching and event in _WATCHED:
        _events.append((event, args))


sys.addaudithook(_audit)


@contextmanager
def nothing_runs() -> Iterator[None]:
    """Fail if the block runs os.system, subprocess.Popen or exec (told by audit events)."""
    global _watching
    # Decoders of protocol 0's text opcodes import their codec module on first use: a
    # stdlib import (an exec event), not the record's code; import them before watching.
    "".encode("raw_unicode_escape").decode("raw_unicode_escape")
    # pstore's restricted unpickler is imported at the first unsigned record (its modules'
    # code, and the dataclasses of its policy, are exec events too): import it first.
    importlib.import_module("pstore.store.untrusted")
    _events.clear()
    _watching = True
    try:
        yield
    finally:
        _watching = False
    assert _events == [], f"foreign code ran: {_events}"


def test_a_users_own_store_loads_custom_classes(opener):
    with opener() as store:
        store["config"] = Config("run", 3)
        store["node"] = Node("root", [Node("child")])
    with opener("r") as store:
        assert store["config"] == Config("run", 3)
        assert store["node"].children[0].name == "child"
        assert store.verify().signed == 3     # config, and the two nodes' records


def test_another_users_store_loads_data_arrays_and_frames_and_refuses_code(opener, tmp_path):
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    marker = tmp_path / "ran"
    frame = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    with opener(key=BOB) as store:
        store["data"] = {"n": 1, "xs": [1.5, "two", b"3", (4,)], "s": {5, 6}}
        store["array"] = np.arange(100_000, dtype=np.float32)
        store["small"] = np.arange(6).reshape(2, 3)
        store["frame"] = frame
        store["shell"] = Shell(f"touch {marker}")
        store["config"] = Config("bob's")
    with opener("r") as store, nothing_runs():
        assert store["data"] == {"n": 1, "xs": [1.5, "two", b"3", (4,)], "s": {5, 6}}
        assert (store["array"] == np.arange(100_000, dtype=np.float32)).all()
        assert store["small"].tolist() == [[0, 1, 2], [3, 4, 5]]
        pd.testing.assert_frame_equal(store["frame"], frame)
        with pytest.raises(pstore.UntrustedError) as raised:
            store["shell"]
        with pytest.raises(pstore.UntrustedError, match="tests.store.objects.Config"):
            store["config"]
    error = raised.value
    assert error.global_name == f"{os.system.__module__}.system"
    assert error.key == "shell" and error.object_id is not None
    assert store.path in str(error) and "allow=" in str(error) and "trust" in str(error)
    assert isinstance(error, pickle.UnpicklingError) and isinstance(error, pstore.Error)
    assert not marker.exists()


def test_allow_admits_a_named_class_and_only_it(opener):
    with opener(key=BOB) as store:
        store["config"] = Config("bob's", 2)
        store["node"] = Node("n")
    with opener("r", allow=["tests.store.objects.Config"]) as store:
        assert store["config"] == Config("bob's", 2)
        with pytest.raises(pstore.UntrustedError, match="tests.store.objects.Node"):
            store["node"]
    with opener("r", allow=["tests.store.objects.*"]) as store:
        assert store["node"].name == "n"
    with opener("r", allow="*") as store:      # the unsafe opt-out: everything loads
        assert store["config"].size == 2
    with pytest.raises(pstore.ArgumentError):
        opener("r", allow="tests.store.objects.Config")


def _rewrite(store: pstore.Store, key: str, data: bytes) -> None:
    """Replace the bytes of ``key``'s record as a writer without the key would."""
    backend = store._txn.backend
    with backend.writing():
        oid = backend.get_key(key)
        refs = backend.refs_of(oid)
        eager = set(backend.refs_of(oid, lazy=False))
        backend.put_record(oid, data, refs, lazy_refs=[ref for ref in refs if ref not in eager])


def test_a_flipped_byte_in_any_value_of_ones_own_store_is_an_integrity_error(opener):
    values = {"int": 7, "text": "hello " * 20, "config": Config("c", 1),
              "nested": {"a": [1, 2], "b": (3.5, None)}}
    with opener() as store:
        store.update(values)
    writer = opener("w")
    for key in values:
        original = writer.raw_record(key)[1]
        positions = range(len(original)) if key == "int" else range(0, len(original), 5)
        for position in positions:
            damaged = bytearray(original)
            damaged[position] ^= 0x20
            _rewrite(writer, key, bytes(damaged))
            with opener("r") as reader:
                with pytest.raises(pstore.IntegrityError) as raised:
                    reader[key]
            assert raised.value.key == key, position
            assert reader.path in str(raised.value)
        _rewrite(writer, key, original)
    with opener("r") as reader:
        assert dict(reader.items()) == values


def _gadgets() -> dict[str, bytes]:
    """Hostile pickles, one per way of reaching code; each would run `touch ran` or import
    ``this`` (which prints when imported) if loaded with full semantics."""
    system = os.system.__module__.encode()      # posix (nt on Windows)
    command = b"touch ran"
    short = bytes([len(system)]) + system
    return {
        "global_reduce": b"c" + system + b"\nsystem\n(V" + command + b"\ntR.",
        "stack_global": (b"\x80\x04\x8c" + short + b"\x8c\x06system\x93\x8c"
                         + bytes([len(command)]) + command + b"\x85R."),
        "inst": b"(V" + command + b"\ni" + system + b"\nsystem\n.",
        "obj": b"(c" + system + b"\nsystem\nV" + command + b"\no.",
        "newobj_build": (b"\x80\x02ctests.store.objects\nShell\n)\x81V" + command + b"\nb."),
        "eval": b"cbuiltins\neval\n(Vprint('ran')\ntR.",
        "persistent_id_import": b"P1 this Anything\n.",
        "popen": b"csubprocess\nPopen\n((V" + b"touch\nVran\nltR.",
        "getattr": b"cbuiltins\ngetattr\n(c" + system + b"\nsystem\nV__call__\ntR.",
        "import": b"cbuiltins\n__import__\n(Vos\ntR.",
        "resolve_name": b"cpkgutil\nresolve_name\n(V" + system + b".system\ntR.",
        # EXT1 code 0xF0, registered below as os.system's, then called
        "ext1": b"\x80\x02\x82\xf0V" + command + b"\n\x85R.",
        # A gadget followed by junk: refused at the gadget, not after "until the error"
        "broken_stream": b"c" + system + b"\nsystem\n(V" + command + b"\ntR\xff\xff",
    }


@pytest.mark.parametrize("gadget", sorted(_gadgets()))
def test_gadget_records_written_raw_are_refused_in_restricted_mode(opener, gadget, tmp_path,
                                                                  monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    payload = _gadgets()[gadget]
    if gadget == "ext1":    # what the extension registry of the loading process holds
        copyreg.add_extension(os.system.__module__, "system", 0xF0)
        request.addfinalizer(lambda: copyreg.remove_extension(os.system.__module__, "system",
                                                              0xF0))
    store = opener()
    store["other"] = 1
    backend = store._txn.backend
    with backend.writing():
        oid = backend.new_oid()
        # A valid unsigned envelope: its digest matches, it carries no fingerprint.
        backend.put_record(oid, records.pack(oid, payload, [], 0), [])
        backend.bind_key("gadget", oid)
    was_imported = "this" in sys.modules
    with opener("r") as reader, nothing_runs():
        with pytest.raises(pstore.UntrustedError) as raised:
            reader["gadget"]
        with pytest.raises(pstore.UntrustedError):
            reader.load_restricted("gadget")
    assert raised.value.key == "gadget" and raised.value.object_id == oid
    assert not (tmp_path / "ran").exists()
    assert ("this" in sys.modules) == was_imported


def test_each_record_loads_by_its_own_signature(opener):
    """A trusted record may refer to an untrusted one, and the other way round."""
    signer = signer_for(None)
    store = opener()
    store["mine"] = Config("mine")
    backend = store._txn.backend
    mine = backend.get_key("mine")
    hostile = _gadgets()["global_reduce"]
    with backend.writing():
        bad, theirs, wrapper = backend.new_oid(), backend.new_oid(), backend.new_oid()
        backend.put_record(bad, records.pack(bad, hostile, [], 0), [])
        # Unsigned, plain data referring to a signed record holding a custom class.
        ref = b"\x80\x05]\x94(K\x01K" + bytes([mine]) + b"Qe."
        backend.put_record(theirs, records.pack(theirs, ref, [], 0), [mine])
        backend.bind_key("theirs", theirs)
        # Signed, referring to the unsigned hostile record.
        own = b"\x80\x05}\x94\x8c\x01x\x94K" + bytes([bad]) + b"Qs."
        backend.put_record(wrapper, records.pack(wrapper, own, [], 0, signer), [bad])
        backend.bind_key("wrapper", wrapper)
    with opener("r") as reader, nothing_runs():
        assert reader["theirs"] == [1, Config("mine")]
        with pytest.raises(pstore.UntrustedError) as raised:
            reader["wrapper"]
    assert raised.value.object_id == bad and raised.value.key == "wrapper"


def test_globals_then_trust_makes_anothers_records_ones_own(opener):
    with opener(key=BOB) as store:
        store["config"] = {"c": Config("bob's"), "n": 1}
        store["node"] = Node("root", [Node("leaf")])
        store["plain"] = [1, 2]
    store = opener("w")
    assert store.globals("config") == ["tests.store.objects.Config"]
    assert store.globals("plain") == []
    assert "tests.store.objects.Node" in store.globals()
    assert "tests.store.objects.Node" in store.globals("node")
    with pytest.raises(pstore.UntrustedError):
        store["config"]
    assert store.trust(["config"]) == 1
    assert store["config"]["c"] == Config("bob's")
    with pytest.raises(pstore.UntrustedError):
        store["node"]
    assert store.trust() == 3       # node, its child's record and plain
    assert store.trust() == 0
    assert store["node"].children[0].name == "leaf"
    with opener("r") as reader:
        assert reader.verify().ok
        assert reader["node"].name == "root"
    with opener("r", key=BOB) as bobs:     # now Alice's records: Bob reads them restricted
        with pytest.raises(pstore.UntrustedError):
            bobs["config"]


def test_trust_never_signs_damage(opener):
    with opener(key=BOB) as store:
        store["x"] = [1, 2, 3]
    store = opener("w")
    data = bytearray(store.raw_record("x")[1])
    data[len(data) // 2] ^= 1
    _rewrite(store, "x", bytes(data))
    with pytest.raises(pstore.CorruptionError):
        store.trust()


def test_the_stores_fingerprint_is_its_creators(opener):
    with opener() as store:
        mine = store.key_fingerprint
        assert store.info().key_fingerprint == mine
    with opener("w", key=BOB) as store:
        assert store.key_fingerprint != mine
        assert store.info().key_fingerprint == mine
    assert len(mine) == 16 and int(mine, 16) >= 0


# -- the key ---------------------------------------------------------------------------


@pytest.fixture
def no_key_file(monkeypatch, tmp_path) -> str:
    """No PSTORE_KEY_FILE; the user data folder in the test's folder: the default key's path."""
    monkeypatch.delenv("PSTORE_KEY_FILE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return str(tmp_path / "data" / "pstore" / "key")


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the XDG folder is Linux's")
def test_the_default_key_is_created_once_private_and_kept(no_key_file):
    first = signer_for(None)
    info = os.stat(no_key_file)
    assert info.st_mode & 0o777 == 0o600 and info.st_size == 32
    assert signer_for(None).fingerprint == first.fingerprint
    assert os.listdir(os.path.dirname(no_key_file)) == ["key"]     # no temporary file left


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the XDG folder is Linux's")
def test_processes_starting_at_once_end_with_one_key(no_key_file):
    code = ("import sys; from pstore.store.signing import signer_for; sys.stdin.read(); "
            "print(signer_for(None).fingerprint_hex)")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    children = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env, text=True)
                for _ in range(6)]
    for child in children:      # all started, then all released together
        child.stdin.close()
    prints = {child.stdout.read().strip() for child in children}
    assert all(child.wait() == 0 for child in children)
    assert len(prints) == 1
    with open(no_key_file, "rb") as file:
        assert prints == {signer_for(file.read()).fingerprint_hex}


def test_a_bad_key_file_is_a_clear_error(monkeypatch, tmp_path):
    target = tmp_path / "real.key"
    target.write_bytes(os.urandom(32))
    link = tmp_path / "link.key"
    link.symlink_to(target)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    for path, reason in [(link, "symbolic link"), (short, "31 bytes"),
                         (tmp_path, "not a regular file")]:
        monkeypatch.setenv("PSTORE_KEY_FILE", str(path))
        with pytest.raises(pstore.KeyFileError, match=reason) as raised:
            signer_for(None)
        assert str(path) in str(raised.value)
    with pytest.raises(pstore.ArgumentError, match="key"):
        pstore.open(str(tmp_path / "s.db"), key=b"short")


def test_the_trust_command_lists_asks_and_signs(opener, backend_name, path):
    if backend_name == "postgresql":
        pytest.skip("the CLI's store tests are file tests")
    with opener(key=BOB) as store:
        store["config"] = Config("bob's")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    run = [sys.executable, "-m", "pstore", "trust", path, "config"]
    refused = subprocess.run(run, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert refused.returncode != 0 and "--yes" in refused.stderr
    done = subprocess.run([*run, "--yes"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "tests.store.objects.Config" in done.stdout and "signed 1 records" in done.stdout
    with opener("r") as store:
        assert store["config"] == Config("bob's")
