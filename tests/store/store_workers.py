"""Functions the multi-process tests run in other processes (started with 'spawn')."""

from __future__ import annotations

import sys

import pstore

from .objects import Config, Node


def write_issue_example(backend: str, path: str) -> None:
    cfg = Config("cfg", size=3)
    with pstore.open(path, backend=backend) as store:
        store["config"] = cfg
        store["run1"] = {"cfg": cfg}
        store["run2"] = {"cfg": cfg}


def check_issue_example(backend: str, path: str) -> bool:
    with pstore.open(path, "r", backend=backend) as store:
        return (store["run1"]["cfg"] is store["run2"]["cfg"] is store["config"]
                and store["config"] == Config("cfg", size=3))


def set_key(backend: str, path: str, key: str, value: object) -> None:
    with pstore.open(path, "w", backend=backend) as store:
        store[key] = value


def rewrite_config(backend: str, path: str, size: int) -> None:
    with pstore.open(path, "w", backend=backend) as store:
        cfg = store["config"]
        cfg.size = size
        store["config"] = cfg


def increment(backend: str, path: str, times: int) -> None:
    with pstore.open(path, "w", backend=backend, lock_timeout=120) as store:
        for _ in range(times):
            with store.transaction():
                store["counter"] = store["counter"] + 1


def open_together(backend: str, path: str, together, rounds: int) -> None:
    """Open, write and close the store ``rounds`` times, each time at the same moment as
    the other processes waiting on the barrier ``together`` (which a failure breaks)."""
    try:
        for round_ in range(rounds):
            together.wait()
            with pstore.open(path, "w", backend=backend, lock_timeout=60) as store:
                store[f"round {round_}"] = True
            together.wait()
    except BaseException:
        together.abort()
        raise


def hold_transaction(backend: str, path: str, holding, release) -> None:
    with pstore.open(path, "w", backend=backend) as store:
        with store.transaction():
            store["held"] = True
            holding.set()
            release.wait(60)


def read_while_collecting(backend: str, path: str, rounds: int) -> int:
    """Read every key `rounds` times; return how many reads returned the expected value."""
    good = 0
    with pstore.open(path, "r", backend=backend) as store:
        for _ in range(rounds):
            for key in list(store):
                if key.startswith("keep") and shares_one_object(store, key):
                    good += 1
    return good


def shares_one_object(store: pstore.Store, key: str) -> bool:
    """Whether ``store[key][0]["shared"] is store["shared"]``.

    A commit by another process between the two reads rightly makes the second read
    load afresh, so the check is tried again: the writer of the gc test commits three
    times in all, so one of four tries falls between commits.
    """
    return any(store[key][0]["shared"] is store["shared"] for _ in range(4))


def transaction_loop(backend: str, path: str) -> None:
    """Update 'a' and 'b' together forever; print each acknowledged value."""
    with pstore.open(path, backend=backend) as store:
        i = store.get("a", 0)
        while True:
            i += 1
            with store.transaction():
                store["a"] = i
                store["big"] = [i] * 1000
                store["b"] = i
            sys.stdout.write(f"{i}\n")
            sys.stdout.flush()


def set_attribute(backend: str, path: str, key: str, name: str, value: object) -> None:
    """Change an attribute of the Persistent object of ``key`` (committed by close())."""
    with pstore.open(path, "w", backend=backend) as store:
        setattr(store[key], name, value)


def change_child(backend: str, path: str, key: str, name: str) -> None:
    """Rename the first child of ``key``'s Persistent object: only the child is written."""
    with pstore.open(path, "w", backend=backend) as store:
        store[key].children[0].name = name


def build_cycle(backend: str, path: str) -> None:
    a, b = Node("a"), Node("b")
    a.other, b.other = b, a
    with pstore.open(path, backend=backend) as store:
        store["a"] = a
        store["b"] = b


def check_cycle(backend: str, path: str) -> bool:
    with pstore.open(path, "r", backend=backend) as store:
        a, b = store["a"], store["b"]
        return a.other is b and b.other is a and (a.name, b.name) == ("a", "b")


def array_transaction_loop(backend: str, path: str) -> None:
    """Store arrays as blobs in transactions forever; print each acknowledged value.

    Each transaction writes two new blobs ('features', 'labels'), reuses one that
    exists ('same'), and every fifth one also collects garbage, so a kill can land
    in a blob's write, its fsync, its rename, the commit or a gc's removals.
    """
    import numpy as np

    with pstore.open(path, backend=backend, blob_threshold=1024) as store:
        i = int(store["labels"][0]) if "labels" in store else 0
        same = np.arange(100_000)
        while True:
            i += 1
            with store.transaction():
                store["features"] = np.full(200_000, float(i))
                store["same"] = {"i": i, "array": same}
                store["labels"] = np.full(50_000, i)
            if i % 5 == 0:
                store.gc()
            sys.stdout.write(f"{i}\n")
            sys.stdout.flush()


if __name__ == "__main__":
    loop = array_transaction_loop if sys.argv[3:] == ["arrays"] else transaction_loop
    loop(sys.argv[1], sys.argv[2])
