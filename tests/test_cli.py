"""The ``pstore`` command, run as a real process against real files."""

from __future__ import annotations

import collections
import fcntl
import os
import pty
import shelve
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

import pstore
from pstore import engine

BACKENDS = ["sqlite", "dbm"]


def run(*args: str, cwd: Path, status: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "pstore", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == status, (done.stdout, done.stderr)
    return done


def out(*args: str, cwd: Path) -> str:
    return run(*args, cwd=cwd).stdout


@pytest.fixture(params=BACKENDS)
def made(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A store of the test's backend with a dict, an array, a Persistent object and garbage."""
    np = pytest.importorskip("numpy")
    path = tmp_path / "s.db"
    with pstore.open(path, backend=request.param) as store:
        store["config"] = {"lr": 0.1}
        store["arr"] = np.arange(100_000)
        persistent = pstore.PersistentDict()
        persistent["z"] = 1
        store["p"] = persistent
        store["od"] = collections.OrderedDict(a=1)
        for number in range(50):
            store[f"junk{number}"] = "x" * 2000
        for number in range(50):
            del store[f"junk{number}"]
    return path


def test_demo_stores_and_reloads_a_graph_in_another_process(tmp_path: Path) -> None:
    text = out("demo", str(tmp_path / "demo.db"), cwd=tmp_path)
    assert "share one config object: True" in text
    assert text.rstrip().endswith("demo ok")


def test_dis_and_globals_of_a_pickle_file(tmp_path: Path) -> None:
    (tmp_path / "x.pickle").write_bytes(engine.dumps(collections.OrderedDict(a=1), 2))
    assert "GLOBAL" in out("dis", "x.pickle", cwd=tmp_path)
    assert out("globals", "x.pickle", cwd=tmp_path).split() == ["collections.OrderedDict"]


def test_ls_lists_keys_sizes_kinds_and_blobs_without_loading(made: Path) -> None:
    lines = out("ls", made.name, cwd=made.parent).splitlines()
    assert lines[0].split() == ["key", "oid", "bytes", "blobs", "kind"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["arr", "config", "od", "p"]
    assert rows["config"].endswith(" dict")
    assert "800.0 kB" in rows["arr"] and rows["arr"].endswith("numpy.ndarray")
    assert rows["p"].endswith("pstore.store.persistent.PersistentDict (Persistent)")
    assert rows["od"].endswith("collections.OrderedDict")
    assert [line.split()[0] for line in out("ls", made.name, "c*", cwd=made.parent)
            .splitlines()[1:]] == ["config"]


def test_info_names_backend_version_and_counts(made: Path) -> None:
    text = out("info", made.name, cwd=made.parent)
    backend = "sqlite" if "sqlite3 (SQLite" in text else "dbm"
    assert f"backend:        {backend}" in text
    assert "keys:           4" in text
    assert "blobs:          1 (800.0 kB)" in text


def test_dis_of_a_key_shows_its_record_and_blobs(made: Path) -> None:
    text = out("dis", made.name, "arr", cwd=made.parent)
    assert "NEXT_BUFFER" in text and "800000 bytes" in text


def test_gc_reports_and_vacuum_shrinks(made: Path) -> None:
    with pstore.open(made, "w") as store:
        del store["arr"]
    text = out("gc", made.name, cwd=made.parent)
    assert "and 1 unused blobs (800.0 kB)" in text
    # In place (SQLite, dbm.gnu, dbm.sqlite3) or by rewriting the database (dbm.dumb).
    shrank = out("vacuum", made.name, cwd=made.parent)
    assert shrank.startswith("the store's files shrank by ") and "by 0 bytes" not in shrank
    with pstore.open(made, "r") as store:
        assert store["config"] == {"lr": 0.1}


def test_copy_to_the_other_backend_keeps_values_and_refuses_a_full_target(made: Path) -> None:
    np = pytest.importorskip("numpy")
    other = "dbm" if "sqlite" in out("info", made.name, cwd=made.parent) else "sqlite"
    text = out("copy", made.name, "copy.db", "--target-backend", other, cwd=made.parent)
    assert text.startswith("copied 4 keys from s.db into copy.db")
    assert other in out("info", "copy.db", cwd=made.parent)
    with pstore.open(made.parent / "copy.db", "r") as store:
        assert store["config"] == {"lr": 0.1} and store["p"]["z"] == 1
        assert isinstance(store["p"], pstore.PersistentDict)
        assert np.array_equal(store["arr"], np.arange(100_000))
    refused = run("copy", made.name, "copy.db", cwd=made.parent, status=1)
    assert "not empty" in refused.stderr and refused.stderr.count("\n") == 1
    assert "copied 4 keys" in out("copy", made.name, "copy.db", "--flag", "n", cwd=made.parent)


def test_errors_are_one_line_with_status_1_and_usage_errors_status_2(tmp_path: Path) -> None:
    missing = run("ls", "nope.db", cwd=tmp_path, status=1)
    assert missing.stderr.count("\n") == 1 and "nope.db" in missing.stderr
    assert "Traceback" not in missing.stderr
    with pstore.open(tmp_path / "s.db") as store:
        store["a"] = 1
    nokey = run("dis", "s.db", "b", cwd=tmp_path, status=1)
    assert nokey.stderr == "pstore dis: no key 'b'\n"
    debug = run("--debug", "ls", "nope.db", cwd=tmp_path, status=1)
    assert "Traceback" in debug.stderr
    run("ls", cwd=tmp_path, status=2)
    run("frobnicate", cwd=tmp_path, status=2)


def test_convert_from_shelve_sqlitedict_and_zodb(tmp_path: Path) -> None:
    sqlitedict = pytest.importorskip("sqlitedict")
    with shelve.open(str(tmp_path / "old")) as shelf:
        shelf["a"] = [1, 2]
    assert "copied 1 key from the shelve" in out("convert", "old", "from_shelve.db",
                                                   cwd=tmp_path)
    with sqlitedict.SqliteDict(str(tmp_path / "old.sqlite")) as old:
        old["b"] = {"x": "y"}
        old.commit()
    assert "copied 1 key from the sqlitedict" in out("convert", "old.sqlite", "from_sd.db",
                                                       "--target-backend", "dbm",
                                                       cwd=tmp_path)
    with pstore.open(tmp_path / "from_shelve.db", "r") as store:
        assert dict(store.items()) == {"a": [1, 2]}
    with pstore.open(tmp_path / "from_sd.db", "r") as store:   # told to be DBM from its files
        assert dict(store.items()) == {"b": {"x": "y"}}


def test_convert_refuses_tuple_keys_in_one_line_and_maps_them_when_asked(tmp_path: Path) -> None:
    diskcache = pytest.importorskip("diskcache")
    with diskcache.Cache(str(tmp_path / "cache")) as cache:
        cache[("user", 1)] = "u"
        cache["plain"] = "p"
    refused = run("convert", "cache", "new.db", cwd=tmp_path, status=1)
    assert refused.stderr.count("\n") == 1 and "('user', 1)" in refused.stderr
    out("convert", "cache", "new.db", "--keys", "repr", cwd=tmp_path)
    with pstore.open(tmp_path / "new.db", "r") as store:
        assert dict(store.items()) == {"('user', 1)": "u", "plain": "p"}


def run_in_pty(*args: str, cwd: Path) -> str:
    """Run the command with a terminal as stdout and stderr; return all it wrote."""
    leader, follower = pty.openpty()
    # A terminal of 24 rows and 80 columns (a new pty has 0 of each: tqdm draws nothing).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "pstore", *args], cwd=cwd,
                               stdout=follower, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:     # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(60) == 0
    return b"".join(chunks).decode(errors="replace")


def test_a_progress_bar_on_a_terminal_and_none_otherwise(tmp_path: Path) -> None:
    pytest.importorskip("tqdm")
    with shelve.open(str(tmp_path / "old")) as shelf:
        for number in range(50):
            shelf[f"k{number}"] = number
    on_terminal = run_in_pty("convert", "old", "a.db", cwd=tmp_path)
    assert "convert:" in on_terminal and " keys" in on_terminal and "\r" in on_terminal
    piped = run("convert", "old", "b.db", cwd=tmp_path)
    assert "convert:" not in piped.stdout + piped.stderr
    assert piped.stdout.startswith("copied 50 keys")


def test_copy_shows_a_progress_bar_of_records_on_a_terminal(made: Path) -> None:
    pytest.importorskip("tqdm")
    on_terminal = run_in_pty("copy", made.name, "copy.db", cwd=made.parent)
    assert "copy:" in on_terminal and " records" in on_terminal
    assert "copied 4 keys" in on_terminal


# -- a store holding a hostile record: looking at it never runs it ------------------------

_WATCH = """
import runpy, sys
mark = sys.argv.pop(1)
def audit(event, args):
    if event in ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn"):
        with open(mark, "a") as file:
            file.write(event + "\\n")
sys.addaudithook(audit)
sys.argv[0] = "pstore"
runpy.run_module("pstore", run_name="__main__")
"""


class _Shell:
    """Pickles to a call of os.system (the hostile record)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return os.system, (self.command,)


def watched(*args: str, cwd: Path, mark: Path, status: int = 0) -> subprocess.CompletedProcess[str]:
    """The real command, in a process whose audit hook writes to ``mark`` whatever
    os.system/subprocess/exec call it sees."""
    done = subprocess.run([sys.executable, "-c", _WATCH, str(mark), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status, (done.stdout, done.stderr)
    return done


@pytest.mark.parametrize("backend", BACKENDS)
def test_ls_info_show_globals_on_a_hostile_record_never_run_it(tmp_path: Path,
                                                             backend: str) -> None:
    path, mark, ran = tmp_path / "s.db", tmp_path / "audit", tmp_path / "ran"
    with pstore.open(path, backend=backend) as store:     # signed with the user's own key
        store["config"] = {"lr": 0.1}
        store["evil"] = _Shell(f"touch {ran}")
    assert "evil" in watched("ls", str(path), cwd=tmp_path, mark=mark).stdout
    assert "key:" in watched("info", str(path), cwd=tmp_path, mark=mark).stdout
    assert watched("globals", str(path), "evil", cwd=tmp_path,
                   mark=mark).stdout.split() == [f"{os.system.__module__}.system"]
    shown = watched("show", str(path), "evil", cwd=tmp_path, mark=mark, status=1)
    assert f"{os.system.__module__}.system" in shown.stderr and "Traceback" not in shown.stderr
    assert len(shown.stderr.strip().splitlines()) == 1
    assert watched("show", str(path), "config", cwd=tmp_path,
                   mark=mark).stdout.strip() == "{'lr': 0.1}"
    disassembly = watched("show", str(path), "evil", "--dis", cwd=tmp_path, mark=mark).stdout
    assert f"'{os.system.__module__}'" in disassembly and "REDUCE" in disassembly
    assert not mark.exists() and not ran.exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_names_the_key_of_a_flipped_byte(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s.db"
    with pstore.open(path, backend=backend) as store:
        store["a"] = {"value": 1}
        store["b"] = "text " * 40
    run("verify", str(path), cwd=tmp_path)     # status 0: nothing damaged
    with pstore.open(path, "w", backend=backend) as store:
        oid, data = store.raw_record("b")
        damaged = bytearray(data)
        damaged[len(damaged) // 2] ^= 0x10
        writer = store._txn.backend
        with writer.writing():
            writer.put_record(oid, bytes(damaged), [])
    done = run("verify", str(path), cwd=tmp_path, status=1)
    assert "'b'" in done.stdout and f"object id {oid}" in done.stdout, done.stdout
