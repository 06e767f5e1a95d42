"""Functions the compute-once tests run in other processes (started with 'spawn')."""

from __future__ import annotations

import os
import time

import pstore


def compute_dataset(backend: str, path: str, log: str, start, seconds: float, results) -> None:
    """Wait for `start`, then ask for the missing key "dataset"; the compute logs its pid."""
    def build() -> dict:
        with open(log, "a") as file:
            file.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        return {"rows": list(range(100)), "by": os.getpid()}

    with pstore.open(path, "w", backend=backend) as store:
        start.wait(30)
        results.put(store.get_or_compute("dataset", build))


def compute_then_fail(backend: str, path: str, started, seconds: float, results) -> None:
    """Compute "dataset", signal `started` once computing, and raise after `seconds`."""
    def build() -> dict:
        started.set()
        time.sleep(seconds)
        raise RuntimeError("the compute failed")

    with pstore.open(path, "w", backend=backend) as store:
        try:
            store.get_or_compute("dataset", build)
        except RuntimeError as error:
            results.put(str(error))
        else:
            results.put("no error")


def compute_until_released(backend: str, path: str, started, release, results) -> None:
    def build() -> str:
        started.set()
        release.wait(60)
        return "slow value"

    with pstore.open(path, "w", backend=backend) as store:
        results.put(store.get_or_compute("slow", build))


def read_key_of_a_sent_store(store: pstore.Store, key: str) -> object:
    """Runs in a spawn pool's worker: the Store arrived pickled."""
    value = store[key]
    store[key + "/seen"] = os.getpid()
    return value
