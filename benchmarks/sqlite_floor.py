"""What one committed single set costs in SQLite itself, beside pstore's and diskcache's.

    python3 benchmarks/sqlite_floor.py              # 5,000 sets, medians of 3 rounds
    python3 benchmarks/sqlite_floor.py --sets 20000

"floor" runs, through the sqlite3 module, the statements a pstore single set of a new
key sends (``BEGIN IMMEDIATE``, ``PRAGMA data_version``, the key's insert, the
record's insert, ``COMMIT``) on tables of the same shape, in WAL mode with
``synchronous=NORMAL`` as pstore's SQLite stores run -- no pickling, no envelope,
no lock file. It is what no SQLite-backed store can go below with one commit per
set, and it is printed per statement, so that a target like "single sets 2x
diskcache" can be checked against it (benchmarks/store.py measures the workloads
themselves).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from store import small  # noqa: E402  (the small dicts of benchmarks/store.py)

STATEMENTS = [
    ("BEGIN IMMEDIATE", None),
    ("PRAGMA data_version", None),
    ("INSERT OR IGNORE INTO keys (key, oid, seal) VALUES (?, ?, ?)", "key"),
    ("INSERT OR REPLACE INTO records (oid, data) VALUES (?, ?)", "record"),
    ("COMMIT", None),
]


def floor(directory: str, sets: int) -> tuple[float, list[float]]:
    """Seconds per set, and per statement, of the bare statements."""
    connection = sqlite3.connect(os.path.join(directory, "floor.db"), isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("CREATE TABLE keys (key TEXT PRIMARY KEY, oid INTEGER NOT NULL,"
                       " seal BLOB NOT NULL)")
    connection.execute("CREATE TABLE records (oid INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    cursor = connection.cursor()
    seal = bytes(8)
    # A record the size of pstore's for small(i): envelope, pickle and trailer.
    record = bytes(132)
    spent = [0.0] * len(STATEMENTS)
    clock = time.perf_counter
    started = clock()
    for i in range(sets):
        for n, (sql, params) in enumerate(STATEMENTS):
            arguments = ((f"k{i}", i, seal) if params == "key"
                         else (i, record) if params == "record" else ())
            before = clock()
            cursor.execute(sql, arguments)
            spent[n] += clock() - before
    total = clock() - started
    connection.close()
    return total / sets, [s / sets for s in spent]


def timed_sets(setter: Callable[[str, dict], None], sets: int) -> float:
    started = time.perf_counter()
    for i in range(sets):
        setter(f"k{i}", small(i))
    return (time.perf_counter() - started) / sets


def pstore_sets(directory: str, sets: int) -> float:
    import pstore
    with pstore.open(os.path.join(directory, "store.db")) as store:
        return timed_sets(store.__setitem__, sets)


def diskcache_sets(directory: str, sets: int) -> float | None:
    try:
        import diskcache
    except ImportError:
        return None
    with diskcache.Cache(os.path.join(directory, "cache")) as cache:
        return timed_sets(cache.set, sets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rounds: dict[str, list[float]] = {"floor": [], "pstore": [], "diskcache": []}
    per_statement: list[list[float]] = []
    for _ in range(args.repeat):    # round-robin, so that a busy moment hits all three
        directory = tempfile.mkdtemp(prefix="pstore-floor-")
        try:
            total, statements = floor(directory, args.sets)
            rounds["floor"].append(total)
            per_statement.append(statements)
            rounds["pstore"].append(pstore_sets(directory, args.sets))
            theirs = diskcache_sets(directory, args.sets)
            if theirs is not None:
                rounds["diskcache"].append(theirs)
        finally:
            shutil.rmtree(directory)
    median = {name: statistics.median(values) for name, values in rounds.items() if values}
    print(f"{args.sets:,} single sets of new keys, one commit each; medians of {args.repeat}")
    for name, seconds in median.items():
        print(f"  {name:<10} {seconds * 1e6:7.1f} us/set  {1 / seconds:9,.0f} sets/s")
    print("  the floor, per statement (us):")
    for n, (sql, _) in enumerate(STATEMENTS):
        print(f"    {statistics.median(s[n] for s in per_statement) * 1e6:6.1f}  {sql}")
    if "diskcache" in median:
        target = median["diskcache"] / 2
        print(f"  2x diskcache is {target * 1e6:.1f} us/set: "
              f"{(target - median['floor']) * 1e6:.1f} us beside the floor for everything "
              f"else (pstore spends {(median['pstore'] - median['floor']) * 1e6:.1f} us "
              f"there now)")


if __name__ == "__main__":
    main()
