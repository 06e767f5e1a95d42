"""Freshness on its own, over a real SQLite backend: what a Store knows to be current
(the Store's reads through it are tested in test_store_processes.py and test_store.py)."""

from __future__ import annotations

import pstore
from pstore.backends import open_backend
from pstore.store import freshness
from pstore.store.freshness import Freshness
from pstore.store.identity import IdentityMap
from pstore.store.persistent import CHANGED, SAVED, is_ghost, status_of

from .objects import Node


def opened(path: str):
    return open_backend("sqlite", path, "w", lock_timeout=5, fsync=False)


def test_a_key_read_is_answered_from_memory_until_another_connection_commits(tmp_path):
    path = str(tmp_path / "s.db")
    with pstore.open(path) as store:
        store["k"] = [1]
    backend, other = opened(path), opened(path)
    ids = IdentityMap()
    fresh = Freshness(backend, ids)
    value = [1]
    oid = backend.get_key("k")
    ids.add(value, oid)
    assert fresh.loaded("k") is None    # loaded, but its binding not read through Freshness
    fresh.remember("k", oid)
    assert fresh.loaded("k") == (oid, value)
    with other.writing() as writing:    # another connection commits
        writing.set_meta("touched", "yes")
    assert fresh.loaded("k") is None    # the marker moved: nothing loaded is current
    assert ids.get(oid) is None         # the object forgotten,
    ids.add(value, oid)
    assert fresh.loaded("k") is None    # and the binding too
    backend.close()
    other.close()


def test_forget_keys_keeps_the_objects_and_the_memory_is_bounded(tmp_path, monkeypatch):
    path = str(tmp_path / "s.db")
    with pstore.open(path) as store:
        store["k"] = [1]
    backend = opened(path)
    ids = IdentityMap()
    fresh = Freshness(backend, ids)
    value = [1]
    ids.add(value, 1)
    fresh.remember("k", 1)
    fresh.forget_keys()     # a write transaction begins: bindings may change
    assert fresh.loaded("k") is None and ids.get(1) is value
    monkeypatch.setattr(freshness, "KNOWN_KEYS_MAX", 3)
    for number in range(5):
        fresh.remember(f"key{number}", number)
    for number in range(5):
        ids.add([number], number)   # each binding's object loaded
    assert [fresh.loaded(f"key{number}") is not None for number in range(5)] == \
        [False, False, False, True, True]   # full at 3: cleared, then two more
    backend.close()


def test_reset_takes_the_marker_anew_so_a_commit_before_it_is_no_change(tmp_path):
    path = str(tmp_path / "s.db")
    with pstore.open(path) as store:
        store["k"] = [1]
    backend, other = opened(path), opened(path)
    ids = IdentityMap()
    fresh = Freshness(backend, ids)
    with other.writing() as writing:
        writing.set_meta("touched", "yes")
    fresh.reset()       # (a forked child does this: the marker it had was its parent's)
    value = [1]
    ids.add(value, 1)
    fresh.remember("k", 1)
    assert fresh.loaded("k") == (1, value)
    backend.close()
    other.close()


def test_another_commit_turns_saved_persistent_objects_into_placeholders_only(tmp_path):
    path = str(tmp_path / "s.db")
    with pstore.open(path) as store:
        store["saved"] = Node("saved")
        store["changed"] = Node("changed")
    store = pstore.open(path)
    saved, changed = store["saved"], store["changed"]
    changed.name = "changed in memory"      # not committed: must survive
    assert (status_of(saved), status_of(changed)) == (SAVED, CHANGED)
    with pstore.open(path) as other:
        other["saved"].name = "renamed by another process"
        other.sync()
    store["changed"]     # a read looks at the change marker
    assert is_ghost(saved) and not is_ghost(changed)
    assert saved.name == "renamed by another process"   # loaded again at first use
    assert changed.name == "changed in memory"
    store.close()
