"""Several processes on one store: real processes ('spawn' and fork), real files, SIGKILL."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

import pstore
from pstore.errors import LockTimeoutError

from . import store_workers
from .objects import Config

spawn = multiprocessing.get_context("spawn")


def run(function, *args):
    with spawn.Pool(1) as pool:
        return pool.apply(function, args)


@pytest.mark.slow
def test_identity_across_keys_after_reopening_in_another_process(opener, path, backend_name):
    run(store_workers.write_issue_example, backend_name, path)
    with opener("r") as store:
        assert store["run1"]["cfg"] is store["run2"]["cfg"] is store["config"]
    assert run(store_workers.check_issue_example, backend_name, path)


@pytest.mark.slow
def test_a_write_is_seen_by_the_next_read_elsewhere(opener, path, backend_name):
    store = opener()
    store["config"] = Config("cfg", size=1)
    store["user"] = {"cfg": store["config"]}
    held = store["config"]
    assert held.size == 1
    run(store_workers.set_key, backend_name, path, "new", [1])
    assert store["new"] == [1]
    run(store_workers.rewrite_config, backend_name, path, 2)
    # The cached object is dropped: the next read loads the committed state.
    assert store["config"].size == 2
    assert store["user"]["cfg"] is store["config"]
    # The held (stale) object, assigned again, still rewrites its own record.
    store["config"] = held
    assert store["user"]["cfg"].size == 1


@pytest.mark.slow
def test_a_reference_loads_what_another_process_committed(opener, path, backend_name):
    with opener() as writer:
        writer["config"] = Config("cfg", size=1)
        writer["user"] = {"cfg": writer["config"]}
    store = opener()
    held = store["config"]      # in this Store's identity map from now on
    run(store_workers.rewrite_config, backend_name, path, 2)
    # "user" was never loaded here: its record is read as committed, and its reference
    # to config must not resolve to the object loaded before the other process's commit.
    user = store["user"]
    assert user["cfg"].size == 2
    assert user["cfg"] is store["config"]
    assert held.size == 1


def test_a_record_without_references_is_read_without_the_change_marker(counting_opener):
    """The hot path of a read: the change marker (a query on SQLite) is read only when
    the identity map is about to be used: for references, or for an object already loaded."""
    with counting_opener() as writer:
        writer["plain"] = {"x": 1}
        writer["config"] = Config("cfg", size=1)
        writer["user"] = {"cfg": writer["config"]}
    store = counting_opener()
    before = store.counts["markers"]
    assert store["plain"] == {"x": 1}
    assert store.counts["markers"] == before
    assert store["user"]["cfg"].size == 1
    assert store.counts["markers"] == before + 1
    config = store["config"]    # already loaded, through the reference
    assert store.counts["markers"] == before + 2
    assert config is store["user"]["cfg"]


@pytest.mark.slow
def test_four_processes_increment_without_losing_an_update(opener, path, backend_name):
    with opener() as store:
        store["counter"] = 0
    workers = [spawn.Process(target=store_workers.increment, args=(backend_name, path, 500))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    with opener("r") as store:
        assert store["counter"] == 2000


@pytest.mark.slow
def test_processes_opening_at_once_after_the_last_one_closed(opener, path, backend_name):
    """On SQLite the last writer to close takes the file out of WAL mode, and the next
    ones to open switch it back: all at once, each round."""
    opener().close()
    together = spawn.Barrier(4, timeout=60)
    workers = [spawn.Process(target=store_workers.open_together,
                             args=(backend_name, path, together, 30))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    with opener("r") as store:
        assert all(store[f"round {round_}"] for round_ in range(30))


@pytest.mark.slow
def test_lock_timeout_names_path_and_wait(opener, path, backend_name):
    opener().close()
    holding, release = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=store_workers.hold_transaction,
                           args=(backend_name, path, holding, release))
    holder.start()
    try:
        assert holding.wait(60)
        store = opener(lock_timeout=0.3)
        assert "held" not in store      # readers are not blocked
        with pytest.raises(LockTimeoutError) as raised:
            store["k"] = 1
        assert raised.value.path == path and raised.value.timeout == 0.3
        assert path in str(raised.value) and "0.3 s" in str(raised.value)
        assert "k" not in store
    finally:
        release.set()
        holder.join()
    store["k"] = 1
    assert store["held"] is True


@pytest.mark.slow
def test_gc_keeps_reachable_frees_the_rest_while_others_read(opener, path, backend_name):
    shared = Config("shared")
    with opener() as store:
        with store.transaction():
            store["shared"] = shared
            for i in range(300):
                store[f"keep{i}"] = [{"shared": shared}]
                garbage = Config(f"garbage{i}")
                store[f"g{i}"] = garbage
                store[f"drop{i}"] = [shared, garbage]
        for i in range(300):
            del store[f"g{i}"]      # still referenced by drop{i}: kept
    with opener() as store:
        readers = spawn.Pool(2)
        results = [readers.apply_async(store_workers.read_while_collecting,
                                       (backend_name, path, 5)) for _ in range(2)]
        with store.transaction():
            for i in range(300):
                assert store[f"drop{i}"][1] == Config(f"garbage{i}")
                del store[f"drop{i}"]   # its own record is freed at once; garbage{i} is not
        assert store.gc() == 300
        assert store.gc() == 0
        counts = [result.get(120) for result in results]
        readers.close()
        readers.join()
        assert counts == [1500, 1500]
        assert len(store) == 301
    with opener() as store:
        assert all(store[f"keep{i}"][0]["shared"] is store["shared"] for i in range(300))
    if backend_name == "sqlite":
        import sqlite3
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 301
        conn.close()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_store_used_after_fork_reopens_in_the_child(opener):
    store = opener()
    store["parent"] = [1]
    cached = store["parent"]
    pid = os.fork()
    if pid == 0:   # the child: report through the exit code, never return into pytest
        try:
            ok = store["parent"] == cached
            store["child"] = [2]
            with store.transaction():
                store["child2"] = store["child"] + [3]
            os._exit(0 if ok and store["child2"] == [2, 3] else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store["child2"] == [2, 3]
    store["after"] = 1     # the parent's connection and lock are intact
    assert store["parent"] == cached


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_child_sees_commits_made_before_and_after_the_fork(opener):
    store = opener()
    store["x"] = {"v": 1}
    store["y"] = {"v": 1}
    assert store["x"] == store["y"] == {"v": 1}   # loaded (and cached) before the fork
    with opener() as other:
        rewritten = other["x"]
        rewritten["v"] = 2
        other["x"] = rewritten                     # the same record, rewritten before the fork
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.read(ready_read, 1)                 # wait for the commit after the fork
            os._exit(0 if store["x"] == store["y"] == {"v": 2} else 1)
        except BaseException:
            os._exit(2)
    with opener() as other:
        rewritten = other["y"]
        rewritten["v"] = 2
        other["y"] = rewritten                     # and another, rewritten after the fork
    os.write(ready_write, b"!")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child returned a stale object"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_inside_a_transaction_closes_the_childs_copy(opener):
    store = opener()
    with store.transaction():
        store["before"] = [1]
        pid = os.fork()
        if pid == 0:
            try:
                store["child"] = 1
                os._exit(1)
            except pstore.ClosedError:
                os._exit(0)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        store["after"] = [2]
    assert os.waitstatus_to_exitcode(status) == 0
    assert store["before"] == [1] and store["after"] == [2] and "child" not in store


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_writer_leaves_every_transaction_all_or_nothing(opener, path, backend_name):
    acknowledged = 0
    for kill in range(5):
        writer = subprocess.Popen(
            [sys.executable, "-m", "tests.store.store_workers", backend_name, path],
            stdout=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        # Kill at a varying point in the loop, after a varying number of commits.
        for _ in range(20 + 37 * kill):
            line = writer.stdout.readline()
            assert line, "the writer died on its own"
            acknowledged = int(line)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        with opener("w") as store:
            a, b = store["a"], store["b"]
            assert a == b and a >= acknowledged
            assert store["big"] == [a] * 1000
