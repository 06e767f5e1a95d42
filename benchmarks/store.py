"""pstore (SQLite and DBM backends) against diskcache, sqlitedict, shelve and ZODB, in one run.

    python3 benchmarks/store.py               # the full run: issue 14's table, medians of 3
    python3 benchmarks/store.py --quick       # small sizes, for a smoke run
    python3 benchmarks/store.py --repeat 5    # medians of five rounds
    python3 benchmarks/store.py --peers diskcache,ZODB   # pstore and these peers only
    python3 -m cProfile -s tottime benchmarks/store.py --peers ''   # pstore alone, profiled
    python3 benchmarks/store.py --backends postgresql   # pstore on a throwaway local
                                                        # PostgreSQL server, against ZODB +
                                                        # RelStorage on the same server

It prints one table: a row per workload, a column per library (its figure: the median
of ``--repeat`` rounds, round after round of every library so that a busy moment of the
machine does not fall on one library only), then pstore's ratio to the best peer, to
diskcache and to ZODB (and pstore-dbm's to the best peer). A ratio is how many times
faster pstore is: its rate / the peer's rate, or the peer's time / pstore's time;
above 1 means pstore is ahead. Below the table: whether each of issue 14's targets is
met, how each library runs the 4-process increments, and what ``import pstore`` and
the first ``open`` import (``-X importtime``).

Workloads (the sizes of a full run; ``--quick`` makes them small):

1. 20,000 single sets of small dicts, each committed on its own;
2. 20,000 gets of those keys in random order, after reopening;
3. 100,000 records set in one transaction, and 4. their read-back (iterating the
   items) after reopening;
5. 1,000 records sharing one 10 KB object: the time to write them (and the shared
   object), the bytes on disk, whether the shared object is one object after reopening;
6. 4 processes, each doing 2,000 read-modify-write increments of one counter in
   transactions, timed from the moment all of them have opened the library to the last
   commit; the final count is checked against 8,000 for every library that claims
   atomic increments, and counted as lost updates for the one that cannot;
7. ``import`` of the library, then its first ``open``, in a fresh process (and ``import
   pickle`` for reference);
8. a graph of 10,000 Persistent objects (pstore.Persistent, ZODB's persistent.Persistent)
   in which most nodes have two parents: store it under one key, open that key in a
   fresh Store and read one attribute (lazy loading: one record), walk the whole graph
   from it, commit a change to 1% of its nodes (writes only those).

Durability, the same for every library: a commit that returned survives the process
being killed, not necessarily a power loss. pstore: WAL, synchronous=NORMAL (its
default); pstore-dbm: dbm.dumb with pstore's redo journal, no fsync (its default);
sqlitedict: WAL, synchronous=NORMAL; diskcache: WAL, synchronous=NORMAL (its
default); shelve: dbm.dumb, ``sync()`` after each commit (writes to the OS, never
fsyncs); ZODB: FileStorage with its per-commit fsync switched off (it still writes
each commit to the OS before returning).

dbm.dumb rewrites its whole index on every commit, so N single sets cost it about N
squared: shelve and pstore-dbm run the single sets and the random gets on the first
``--dumb-singles`` keys only (2,000 by default; 0: all of them), marked ``*``, and are
then no candidate for "best peer" in those rows.

``--backends postgresql`` starts a throwaway PostgreSQL cluster (tests/pg.py: Unix
socket only) and runs the same workloads with pstore's PostgreSQL backend against ZODB
on RelStorage (history-free, psycopg2) on that server. Both commit to the server's disk
(synchronous_commit on; the throwaway cluster itself runs with fsync off). It prints the
latency of one round trip. The benchmark asserts nothing about speed: it exits with an
error only if a library returned wrong data or lost an update it claims to prevent.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))

import pstore  # noqa: E402 (needs the repository on sys.path)

try:
    import persistent
except ImportError:
    persistent = None


if persistent is not None:
    class PersistentBlob(persistent.Persistent):
        """ZODB shares an object between records only if it is Persistent."""

        def __init__(self, size: int) -> None:
            self.payload = b"x" * size

    class ZodbNode(persistent.Persistent):
        """A node of the Persistent graph workload, for ZODB."""


class PStoreNode(pstore.Persistent):
    """A node of the Persistent graph workload, for pstore."""


def build_graph(node_class: type, size: int) -> Any:
    """``size`` nodes; node i's children are nodes 2i+1, 2i+2 and 3i+1 (those that exist),
    so that most nodes have two parents. Returns node 0, from which all are reachable."""
    nodes = [node_class() for _ in range(size)]
    for i, node in enumerate(nodes):
        node.number = i
        node.name = f"node-{i}"
        node.children = [nodes[j] for j in sorted({2 * i + 1, 2 * i + 2, 3 * i + 1}) if j < size]
    return nodes[0]


def walk_graph(root: Any) -> list[Any]:
    """Every node reachable from ``root``, each once (depth first)."""
    seen: set[int] = set()
    found = []
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            found.append(node)
            stack.extend(node.children)
    return found


def small(i: int) -> dict:
    """The small dict of workloads 1-4."""
    return {"id": i, "name": f"record-{i}", "tags": ["a", "b"], "score": i * 0.5}


# -- the libraries ----------------------------------------------------------------------------

class Peer:
    """One library, behind the operations the workloads need."""

    name = ""
    #: pstore itself (its columns get the ratio columns), not a peer.
    is_pstore = False
    #: Runs on dbm.dumb, whose every commit rewrites its whole index (see ``--dumb-singles``).
    on_dbm_dumb = False
    #: The class of the Persistent graph's nodes; None: the library has no Persistent objects.
    node_class: type | None = None
    #: Statements, run in a fresh process: import the library; open ``directory`` as
    #: ``handle`` (closed afterwards). None: no cold-start workload.
    import_code: str | None = None
    open_code = ""
    #: Whether read-modify-write increments from several processes lose no update, and how.
    atomic_increments = True
    increments_how = ""

    def worker_state(self) -> dict[str, Any]:
        """The keyword arguments that make this peer again in a worker process."""
        return {}

    def open(self, directory: str) -> None: ...
    def close(self) -> None: ...
    def set_one(self, key: str, value: Any) -> None: ...      # committed when it returns
    def get(self, key: str) -> Any: ...
    def set_many(self, items: Any) -> None: ...                # one transaction
    def items(self) -> Any: ...
    def increment_once(self) -> None: ...                      # "counter" += 1, committed

    def make_shared(self, size: int) -> Any:
        """The shared object of the graph workload; a stdlib class, so that it pickles by
        the same name however this script is run (e.g. under cProfile)."""
        return types.SimpleNamespace(payload=b"x" * size)

    def commit(self) -> None:
        """Commit the changes made to Persistent objects."""

    #: A context in which reads see one snapshot, for peers that offer one beside their
    #: plain reads (pstore's Store.snapshot); None: the peer has no such mode.
    snapshot: Callable[[], Any] | None = None

    @contextlib.contextmanager
    def serving(self, directory: str) -> Iterator[dict[str, Any]]:
        """While the increment workers run: what they need to make this peer again."""
        yield self.worker_state()

    def increment(self, directory: str, times: int, start: Callable[[], None]) -> float:
        """In a worker process: open, ``start()`` (it waits for the other workers), then
        ``times`` increments of "counter"; returns ``time.monotonic()`` after the last."""
        self.open(directory)
        try:
            start()
            for _ in range(times):
                self.increment_once()
            return time.monotonic()
        finally:
            self.close()


class PStore(Peer):
    name = "pstore"
    is_pstore = True
    node_class = PStoreNode
    import_code: str | None = "import pstore"
    open_code = "handle = pstore.open(os.path.join(directory, 'data.db'))"
    increments_how = "store.transaction() (the store's write lock)"

    def open(self, directory: str) -> None:
        self.store = pstore.open(os.path.join(directory, "data.db"))

    def close(self) -> None:
        self.store.close()

    def set_one(self, key: str, value: Any) -> None:
        self.store[key] = value

    def get(self, key: str) -> Any:
        return self.store[key]

    def snapshot(self) -> Any:
        return self.store.snapshot()

    def set_many(self, items: Any) -> None:
        with self.store.transaction():
            for key, value in items:
                self.store[key] = value

    def items(self) -> Any:
        return self.store.items()

    def commit(self) -> None:
        self.store.sync()

    def increment_once(self) -> None:
        with self.store.transaction():
            self.store["counter"] = self.store["counter"] + 1


class PStoreDBM(PStore):
    """pstore's DBM backend, on the dbm module the shelve peer uses (dbm.dumb)."""

    name = "pstore-dbm"
    on_dbm_dumb = True
    open_code = "handle = pstore.open(os.path.join(directory, 'data'), backend='dbm:dbm.dumb')"

    def open(self, directory: str) -> None:
        self.store = pstore.open(os.path.join(directory, "data"), backend="dbm:dbm.dumb")


class Shelve(Peer):
    name = "shelve"
    on_dbm_dumb = True
    import_code = "import dbm.dumb, shelve"
    open_code = "handle = shelve.Shelf(dbm.dumb.open(os.path.join(directory, 'data'), 'c'))"
    increments_how = ("dbm.dumb has no locking: each increment takes an fcntl.flock on a side "
                      "file and reopens the shelf, to see the others' writes")

    def open(self, directory: str) -> None:
        import dbm.dumb
        import shelve
        self.shelf = shelve.Shelf(dbm.dumb.open(os.path.join(directory, "data"), "c"))  # noqa: SIM115

    def close(self) -> None:
        self.shelf.close()

    def set_one(self, key: str, value: Any) -> None:
        self.shelf[key] = value
        self.shelf.sync()

    def get(self, key: str) -> Any:
        return self.shelf[key]

    def set_many(self, items: Any) -> None:
        for key, value in items:
            self.shelf[key] = value
        self.shelf.sync()

    def items(self) -> Any:
        return self.shelf.items()

    def increment(self, directory: str, times: int, start: Callable[[], None]) -> float:
        with open(os.path.join(directory, "lock"), "wb") as lock:
            start()
            for _ in range(times):
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    self.open(directory)
                    try:
                        self.set_one("counter", self.get("counter") + 1)
                    finally:
                        self.close()
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            return time.monotonic()


class SqliteDict(Peer):
    name = "sqlitedict"
    import_code = "from sqlitedict import SqliteDict"
    open_code = ("handle = SqliteDict(os.path.join(directory, 'data.sqlite'), journal_mode='WAL')\n"
                 "handle.conn.execute('PRAGMA synchronous = NORMAL')")
    atomic_increments = False
    increments_how = ("no transaction spans a read and a write: run as d[k] = d[k] + 1; "
                      "d.commit(), its lost updates counted")

    def open(self, directory: str) -> None:
        from sqlitedict import SqliteDict as Dict
        self.dict = Dict(os.path.join(directory, "data.sqlite"), journal_mode="WAL")
        self.dict.conn.execute("PRAGMA synchronous = NORMAL")

    def close(self) -> None:
        self.dict.close()

    def set_one(self, key: str, value: Any) -> None:
        self.dict[key] = value
        self.dict.commit()

    def get(self, key: str) -> Any:
        return self.dict[key]

    def set_many(self, items: Any) -> None:
        for key, value in items:
            self.dict[key] = value
        self.dict.commit()

    def items(self) -> Any:
        return self.dict.items()

    def increment_once(self) -> None:
        self.set_one("counter", self.get("counter") + 1)


class DiskCache(Peer):
    name = "diskcache"
    import_code = "import diskcache"
    open_code = "handle = diskcache.Cache(directory)"
    increments_how = "cache.transact() (SQLite BEGIN IMMEDIATE)"

    def open(self, directory: str) -> None:
        import diskcache
        self.cache = diskcache.Cache(directory)

    def close(self) -> None:
        self.cache.close()

    def set_one(self, key: str, value: Any) -> None:
        self.cache[key] = value

    def get(self, key: str) -> Any:
        return self.cache[key]

    def set_many(self, items: Any) -> None:
        with self.cache.transact():
            for key, value in items:
                self.cache[key] = value

    def items(self) -> Any:
        return ((key, self.cache[key]) for key in self.cache)

    def increment_once(self) -> None:
        with self.cache.transact():
            self.cache["counter"] = self.cache["counter"] + 1


class Zodb(Peer):
    """ZODB on FileStorage; the keys in an OOBTree at the root, as ZODB users keep many keys."""

    name = "ZODB"
    node_class = ZodbNode if persistent is not None else None
    import_code: str | None = "import ZODB, ZODB.FileStorage, BTrees.OOBTree, transaction"
    open_code = ("handle = ZODB.DB(ZODB.FileStorage.FileStorage(os.path.join(directory, "
                 "'data.fs')))\nhandle.open().root()")
    increments_how = ("FileStorage is one process's: the workers are ZEO clients of a ZEO "
                      "server on it (in the benchmark's process); conflicts retried")

    def __init__(self, zeo_address: Any = None) -> None:
        self.zeo_address = zeo_address

    def worker_state(self) -> dict[str, Any]:
        return {"zeo_address": self.zeo_address}

    def open(self, directory: str) -> None:
        import BTrees.OOBTree
        import transaction
        import ZODB
        self.transaction = transaction
        self.db = ZODB.DB(self.make_storage(directory))
        self.connection = self.db.open()
        root = self.connection.root()
        if "data" not in root:
            # A BTree, so that a commit writes the changed bucket, not every record.
            root["data"] = BTrees.OOBTree.OOBTree()
            transaction.commit()
        self.tree = root["data"]

    def make_storage(self, directory: str) -> Any:
        if self.zeo_address is not None:
            import ZEO.ClientStorage
            return ZEO.ClientStorage.ClientStorage(self.zeo_address)
        disable_filestorage_fsync()
        import ZODB.FileStorage
        return ZODB.FileStorage.FileStorage(os.path.join(directory, "data.fs"))

    @contextlib.contextmanager
    def serving(self, directory: str) -> Iterator[dict[str, Any]]:
        try:
            import ZEO
        except ImportError:
            raise Unavailable("ZEO is not installed (pip install ZEO)") from None
        disable_filestorage_fsync()
        # The server logs an error for each worker whose socket closes as its process exits.
        logging.getLogger("ZEO.asyncio.server").setLevel(logging.CRITICAL)
        address, stop = ZEO.server(path=os.path.join(directory, "data.fs"))
        try:
            yield {"zeo_address": address}
        finally:
            stop()

    def close(self) -> None:
        self.transaction.abort()
        self.connection.close()
        self.db.close()

    def set_one(self, key: str, value: Any) -> None:
        self.tree[key] = value
        self.transaction.commit()

    def get(self, key: str) -> Any:
        return self.tree[key]

    def set_many(self, items: Any) -> None:
        for key, value in items:
            self.tree[key] = value
        self.transaction.commit()

    def items(self) -> Any:
        return self.tree.items()

    def make_shared(self, size: int) -> Any:
        return PersistentBlob(size)

    def commit(self) -> None:
        self.transaction.commit()

    def increment_once(self) -> None:
        for number, attempt in enumerate(self.transaction.manager.attempts(1000)):
            if number:  # a conflict: back off a little, or four workers can keep colliding
                time.sleep(random.uniform(0, 0.0005 * min(number, 20)))
            with attempt:
                self.tree["counter"] = self.tree["counter"] + 1


def disable_filestorage_fsync() -> None:
    """FileStorage fsyncs every commit; without its fsync it still writes every commit
    to the OS before returning, which is the durability every peer here runs at."""
    import ZODB.FileStorage
    ZODB.FileStorage.FileStorage.fsync = None


class Unavailable(Exception):
    """A workload this library cannot run here; the message says why."""


def store_name(directory: str) -> str:
    """A store (or database) name for the run in ``directory``: its folder's name."""
    return "".join(c if c.isalnum() else "_" for c in os.path.basename(directory).lower())


class PStorePostgres(PStore):
    """pstore's PostgreSQL backend: one store per run directory, on the benchmark's server."""

    name = "pstore-postgresql"
    import_code = None

    def __init__(self, server: Any) -> None:
        self.server = server

    def worker_state(self) -> dict[str, Any]:
        return {"server": self.server}

    def open(self, directory: str) -> None:
        self.store = pstore.open(self.server.location(store_name(directory)))

    def bytes_used(self, directory: str) -> int:
        return self.server.query(
            "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind IN ('r', 'm')", (store_name(directory),))


class RelStorage(Zodb):
    """ZODB on RelStorage (history-free), one database per run directory, on the same server."""

    name = "RelStorage"
    import_code = None
    increments_how = "each worker its own RelStorage connection; conflicts retried"
    serving = Peer.serving

    def __init__(self, server: Any) -> None:
        super().__init__()
        self.server = server

    def worker_state(self) -> dict[str, Any]:
        return {"server": self.server}

    def make_storage(self, directory: str) -> Any:
        from relstorage.adapters.postgresql import PostgreSQLAdapter
        from relstorage.options import Options
        from relstorage.storage import RelStorage as Storage
        database = store_name(directory)
        if not self.server.query("SELECT count(*) FROM pg_database WHERE datname = %s",
                                 (database,)):
            self.server.query(f"CREATE DATABASE {database}")
        options = Options(keep_history=False)
        dsn = (f"dbname={database} user=postgres host={self.server.directory} "
               f"port={self.server.port}")
        return Storage(PostgreSQLAdapter(dsn=dsn, options=options), options=options)

    def bytes_used(self, directory: str) -> int:
        return self.server.query("SELECT pg_database_size(%s)", (store_name(directory),))


#: Peers by name, with the module each needs.
PEERS: dict[str, tuple[str, type[Peer]]] = {
    "pstore-dbm": ("dbm.dumb", PStoreDBM), "shelve": ("shelve", Shelve),
    "sqlitedict": ("sqlitedict", SqliteDict), "diskcache": ("diskcache", DiskCache),
    "ZODB": ("ZODB", Zodb)}


def available_peers(wanted: list[str]) -> list[Peer]:
    """pstore, then each wanted peer whose module is installed."""
    peers: list[Peer] = [PStore()]
    for name in wanted:
        if not name:
            continue
        if name not in PEERS:
            raise SystemExit(f"unknown peer {name!r}; the peers: {', '.join(PEERS)}")
        module, peer_class = PEERS[name]
        try:
            __import__(module)
        except ImportError:
            print(f"skipping {name}: {module} is not installed")
            continue
        peers.append(peer_class())
    return peers


# -- the workloads ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    singles: int = 20_000
    bulk: int = 100_000
    graph: int = 1_000
    persistent: int = 10_000
    processes: int = 4
    increments: int = 2_000
    #: Single sets (and gets) on dbm.dumb peers; 0: ``singles``.
    dumb_singles: int = 2_000

    def singles_for(self, peer: Peer) -> int:
        if peer.on_dbm_dumb and self.dumb_singles:
            return min(self.singles, self.dumb_singles)
        return self.singles


QUICK = Sizes(singles=300, bulk=3_000, graph=100, persistent=500, increments=30,
              dumb_singles=100)


class WrongResult(Exception):
    """A library returned other data than it was given, or lost an update it claims to prevent."""


def disk_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(directory) for name in names)


def timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@contextlib.contextmanager
def scratch(peer: Peer) -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix=f"bench-{peer.name}-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def check(condition: bool, peer: Peer, what: str) -> None:
    if not condition:
        raise WrongResult(f"{peer.name}: {what}")


def run_singles(peer: Peer, sizes: Sizes) -> dict[str, Any]:
    """Workloads 1 and 2: single sets, each committed; random-order gets after reopening."""
    results: dict[str, Any] = {}
    count = sizes.singles_for(peer)
    order = list(range(count))
    random.Random(14).shuffle(order)
    with scratch(peer) as directory:
        peer.open(directory)

        def set_each() -> None:
            for i in range(count):
                peer.set_one(f"k{i}", small(i))
        results["single sets"] = timed(set_each)
        peer.close()
        peer.open(directory)
        values: list[Any] = []
        results["random gets"] = timed(lambda: values.extend([peer.get(f"k{i}")
                                                              for i in order]))
        peer.close()
        if peer.snapshot is not None:
            peer.open(directory)
            in_snapshot: list[Any] = []

            def get_in_snapshot() -> None:
                with peer.snapshot():
                    in_snapshot.extend([peer.get(f"k{i}") for i in order])
            results["snapshot gets"] = timed(get_in_snapshot)
            peer.close()
            check(in_snapshot == values, peer, "a get in a snapshot returned another value")
    check(values == [small(i) for i in order], peer, "a get returned another value")
    return results


def run_bulk(peer: Peer, sizes: Sizes) -> dict[str, Any]:
    """Workloads 3 and 4: records set in one transaction; their read-back after reopening."""
    results: dict[str, Any] = {}
    with scratch(peer) as directory:
        peer.open(directory)
        results["bulk write"] = timed(lambda: peer.set_many((f"k{i}", small(i))
                                                            for i in range(sizes.bulk)))
        peer.close()
        peer.open(directory)
        read: dict[str, Any] = {}
        results["bulk read"] = timed(lambda: read.update(peer.items()))
        peer.close()
    check(read == {f"k{i}": small(i) for i in range(sizes.bulk)}, peer,
          "the read-back differs from what was written")
    return results


def run_shared_graph(peer: Peer, sizes: Sizes) -> dict[str, Any]:
    """Workload 5: records sharing one 10 KB object: write time, bytes, sharing kept."""
    results: dict[str, Any] = {}
    with scratch(peer) as directory:
        peer.open(directory)
        shared = peer.make_shared(10_000)

        def write_graph() -> None:
            peer.set_one("shared", shared)
            peer.set_many((f"r{i}", {"id": i, "shared": shared}) for i in range(sizes.graph))
        results["graph write"] = timed(write_graph)
        peer.close()
        results["graph bytes"] = getattr(peer, "bytes_used", disk_bytes)(directory)
        peer.open(directory)
        first = peer.get("shared")
        results["graph shared"] = all(peer.get(f"r{i}")["shared"] is first
                                      for i in range(sizes.graph))
        peer.close()
    return results


def _increment_in_process(peer_class: type[Peer], state: dict[str, Any], directory: str,
                          times: int, barrier: Any, stamps: Any) -> None:
    started: list[float] = []

    def start() -> None:
        barrier.wait(timeout=600)   # a worker that failed to open breaks it for the others
        started.append(time.monotonic())
    finished = peer_class(**state).increment(directory, times, start)
    stamps.put((started[0], finished))


def run_increments(peer: Peer, sizes: Sizes) -> dict[str, Any]:
    """Workload 6: ``sizes.processes`` processes each increment one counter, in transactions.

    The time runs from the moment all workers have opened the library to the last one's
    last commit: time.monotonic(), one clock for every process (Linux, macOS)."""
    import multiprocessing
    spawn = multiprocessing.get_context("spawn")
    expected = sizes.processes * sizes.increments
    barrier, stamps = spawn.Barrier(sizes.processes), spawn.Queue()
    with scratch(peer) as directory:
        peer.open(directory)
        peer.set_one("counter", 0)
        peer.close()
        try:
            with peer.serving(directory) as state:
                workers = [spawn.Process(target=_increment_in_process,
                                         args=(type(peer), state, directory, sizes.increments,
                                               barrier, stamps))
                           for _ in range(sizes.processes)]
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()
        except Unavailable as reason:
            return {"increments": None, "increments unavailable": str(reason)}
        check([worker.exitcode for worker in workers] == [0] * sizes.processes, peer,
              "an increment worker failed (its traceback is above)")
        spans = [stamps.get(timeout=60) for _ in workers]
        seconds = max(finished for _, finished in spans) - min(started for started, _ in spans)
        peer.open(directory)
        lost = expected - peer.get("counter")
        peer.close()
    if peer.atomic_increments:
        check(lost == 0, peer, f"{lost} of {expected} increments lost")
    return {"increments": seconds, "lost updates": lost}


def run_persistent_graph(peer: Peer, sizes: Sizes) -> dict[str, Any]:
    """Workload 8: store a graph of Persistent nodes, open it, walk it, change 1%."""
    results: dict[str, Any] = {}
    size = sizes.persistent
    with scratch(peer) as directory:
        peer.open(directory)
        assert peer.node_class is not None
        root = build_graph(peer.node_class, size)
        results["pgraph store"] = timed(functools.partial(peer.set_one, "pgraph", root))
        peer.close()
        del root
        results["pgraph bytes"] = getattr(peer, "bytes_used", disk_bytes)(directory)
        peer.open(directory)
        opened: list[Any] = []
        results["pgraph open"] = timed(lambda: opened.append(peer.get("pgraph").name))
        nodes: list[Any] = []
        results["pgraph walk"] = timed(lambda: nodes.extend(walk_graph(peer.get("pgraph"))))
        check(len(nodes) == size, peer, f"the walk found {len(nodes)} of {size} nodes")

        def change_some() -> None:
            for node in nodes[::100]:
                node.name += "!"
            peer.commit()
        results["pgraph update"] = timed(change_some)
        peer.close()
        peer.open(directory)
        changed = sum(node.name.endswith("!") for node in walk_graph(peer.get("pgraph")))
        check(changed == len(nodes[::100]), peer, f"{changed} changed nodes after reopening")
        peer.close()
    return results


#: The program of the cold-start workload, run as ``python -c PROGRAM directory``.
COLD_START = """\
import os, sys, time
directory = sys.argv[1]
sys.stderr.write("-- import --\\n")
started = time.perf_counter()
{import_code}
imported = time.perf_counter()
sys.stderr.write("-- open --\\n")
{open_code}
opened = time.perf_counter()
{close_code}
print(imported - started, opened - imported)
"""


def cold_start(import_code: str, open_code: str = "", importtime: bool = False,
               ) -> tuple[float, float, str]:
    """Workload 7 in a fresh process: (seconds to import, seconds to open, its stderr)."""
    program = COLD_START.format(import_code=import_code, open_code=open_code or "pass",
                                close_code="handle.close()" if open_code else "")
    environment = dict(os.environ,
                       PYTHONPATH=os.pathsep.join(filter(None, [str(REPOSITORY),
                                                                os.environ.get("PYTHONPATH")])))
    # Bytecode caches are written and used, as a user has them: the peers' installs have
    # theirs (pip compiles them), and without them pstore, from a checkout, would be timed
    # compiling its sources (PYTHONDONTWRITEBYTECODE=1 on these machines) -- 75 ms, not 12.
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as directory:
        command = [sys.executable, *(["-X", "importtime"] if importtime else []),
                   "-c", program, directory]
        result = subprocess.run(command, capture_output=True, text=True, env=environment,
                                cwd=REPOSITORY, check=False)
    if result.returncode:
        raise WrongResult(f"{import_code!r} then {open_code!r} failed:\n{result.stderr}")
    import_seconds, open_seconds = map(float, result.stdout.split())
    return import_seconds, open_seconds, result.stderr


def run_cold_start(peer: Peer) -> dict[str, Any]:
    """Workload 7 for one library."""
    assert peer.import_code is not None
    cold_start(peer.import_code, peer.open_code)    # the bytecode caches written
    import_seconds, open_seconds, _ = cold_start(peer.import_code, peer.open_code)
    return {"import": import_seconds, "first open": open_seconds}


def importtime_summary(import_code: str, open_code: str) -> list[str]:
    """What ``-X importtime`` says of ``import_code`` and then ``open_code``: the modules
    with the most time of their own, and what the open imported."""
    cold_start(import_code, open_code)      # the bytecode caches written, as a user has them
    _, _, stderr = cold_start(import_code, open_code, importtime=True)
    sections: dict[str, list[tuple[float, float, int, str]]] = {
        "startup": [], "import": [], "open": []}
    section = "startup"     # the interpreter's own imports (site), before the program's
    for line in stderr.splitlines():
        if line.startswith("-- ") and line.endswith(" --"):
            section = line[3:-3]
        elif line.startswith("import time:") and "|" in line and "self [us]" not in line:
            own, cumulative, name = line[len("import time:"):].split("|")
            depth = (len(name) - len(name.lstrip()) - 1) // 2
            sections[section].append((int(own) / 1e3, int(cumulative) / 1e3, depth,
                                      name.strip()))
    lines = []
    for section, what in (("import", import_code), ("open", "then the first open")):
        entries = sections[section]
        total = sum(cumulative for _, cumulative, depth, _ in entries if depth == 0)
        heaviest = sorted(entries, reverse=True)[:6]
        lines.append(f"{what}: {len(entries)} modules, {total:.1f} ms"
                     + ("; most own time (ms): " + ", ".join(f"{name} {own:.1f}"
                                                         for own, _, _, name in heaviest)
                        if entries else ""))
        if section == "open" and entries:
            lines.append("  its outermost imports: " + ", ".join(
                f"{name} {cumulative:.1f}" for _, cumulative, depth, name in entries
                if depth == 0))
    return lines


# -- the table --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    key: str            # the result's name in a run's results
    label: str
    unit: str           # "ops/s" (count / time: higher is better), "ms" (lower), or info
    count: int = 0      # operations, for a rate


#: The rows whose count of operations dbm.dumb peers shorten (``--dumb-singles``).
SINGLES = ("single sets", "random gets", "snapshot gets")


def rows_for(sizes: Sizes) -> list[Row]:
    total = sizes.processes * sizes.increments
    return [
        Row("single sets", f"{sizes.singles:,} single sets, one commit each", "ops/s",
            sizes.singles),
        Row("random gets", f"{sizes.singles:,} random-order gets after reopening", "ops/s",
            sizes.singles),
        Row("snapshot gets", "  the same, in one Store.snapshot() (pstore only)", "ops/s",
            sizes.singles),
        Row("bulk write", f"{sizes.bulk:,} records in one transaction", "rec/s", sizes.bulk),
        Row("bulk read", f"read-back of those {sizes.bulk:,} after reopening", "rec/s",
            sizes.bulk),
        Row("graph write", f"{sizes.graph:,} objects sharing one 10 KB object, write", "ms"),
        Row("graph bytes", "  their size on disk", "KB"),
        Row("graph shared", "  the shared object is one after reopening", "yes/no"),
        Row("increments", f"{sizes.processes} processes x {sizes.increments:,} read-modify-write"
            f" increments", "ops/s", total),
        Row("import", "import the library (fresh process)", "ms"),
        Row("first open", "then its first open", "ms"),
        Row("pgraph store", f"Persistent graph of {sizes.persistent:,}: store, one commit", "ms"),
        Row("pgraph open", "  open its key in a fresh Store, read one attribute", "ms"),
        Row("pgraph walk", "  walk all its nodes", "ms"),
        Row("pgraph update", "  change 1% of its nodes, commit", "ms"),
        Row("pgraph bytes", "  its size on disk", "KB"),
    ]


def run_peer(peer: Peer, sizes: Sizes) -> dict[str, Any]:
    """One round of every workload this library has."""
    results = {**run_singles(peer, sizes), **run_bulk(peer, sizes),
               **run_shared_graph(peer, sizes), **run_increments(peer, sizes)}
    if peer.import_code is not None:
        results.update(run_cold_start(peer))
    if peer.node_class is not None:
        results.update(run_persistent_graph(peer, sizes))
    return results


def median_results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of the rounds' times; the first round's facts (bytes, flags, counts)."""
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            merged[key] = statistics.median(run[key] for run in runs)
        elif key == "lost updates":
            merged[key] = max(run[key] for run in runs)
    return merged


class Table:
    """The medians of every library's rounds, as figures, marks and ratios."""

    def __init__(self, peers: list[Peer], sizes: Sizes, runs: dict[str, list[dict[str, Any]]]
                 ) -> None:
        self.peers = peers
        self.sizes = sizes
        self.results = {name: median_results(rounds) for name, rounds in runs.items()}
        self.rows = [row for row in rows_for(sizes)
                     if any(row.key in results for results in self.results.values())]

    def seconds(self, peer: Peer, row: Row) -> float | None:
        value = self.results[peer.name].get(row.key)
        return value if isinstance(value, float) else None

    def count(self, peer: Peer, row: Row) -> int:
        """The operations ``peer`` ran in ``row``'s workload."""
        return self.sizes.singles_for(peer) if row.key in SINGLES else row.count

    def marked(self, peer: Peer, row: Row) -> bool:
        """Not comparable: a dbm.dumb peer's shortened singles, a count with lost updates,
        a shared graph written as copies of the shared object."""
        results = self.results[peer.name]
        if row.key in SINGLES:
            return self.count(peer, row) != row.count
        if row.key == "graph write":
            return results.get("graph shared") is False
        return row.key == "increments" and results.get("lost updates", 0) > 0

    def cell(self, peer: Peer, row: Row) -> str:
        results = self.results[peer.name]
        value = results.get(row.key)
        if row.unit == "yes/no":
            return "—" if value is None else ("yes" if value else "no")
        if row.unit == "KB":
            return "—" if value is None else f"{value / 1000:,.0f}"
        if value is None:
            return "—"
        figure = self.count(peer, row) / value if row.unit.endswith("/s") else value * 1000
        text = format_figure(figure, row.unit)
        if self.marked(peer, row):
            if row.key == "increments":
                return f"{text} (lost {results['lost updates']:,})"
            if row.key == "graph write":
                return f"{text} (copies)"
            return f"{text} *{self.sizes.singles_for(peer):,}"
        return text

    def speedup(self, ours: Peer, peer: Peer, row: Row) -> float | None:
        """How many times faster ``ours`` is than ``peer`` on ``row``; None: not comparable."""
        mine, theirs = self.seconds(ours, row), self.seconds(peer, row)
        if mine is None or theirs is None or self.marked(peer, row) or self.marked(ours, row):
            return None
        return theirs / mine    # comparable: the same count of operations

    def best_peer(self, ours: Peer, row: Row) -> tuple[float, Peer] | None:
        """The ratio to the fastest comparable peer (the lowest speedup), and that peer."""
        found = [(ratio, peer) for peer in self.peers if not peer.is_pstore
                 for ratio in [self.speedup(ours, peer, row)] if ratio is not None]
        return min(found, key=lambda pair: pair[0]) if found else None

    def peer(self, name: str) -> Peer | None:
        return next((peer for peer in self.peers if peer.name == name), None)


def format_figure(figure: float, unit: str) -> str:
    if unit.endswith("/s"):
        if figure >= 1e6:
            return f"{figure / 1e6:.2f}M"
        return f"{figure / 1e3:.1f}k" if figure >= 1e3 else f"{figure:.0f}"
    if figure >= 100:
        return f"{figure:.0f}"
    return f"{figure:.1f}" if figure >= 10 else f"{figure:.2f}"


def format_ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}"


def print_table(table: Table, references: list[str]) -> None:
    """One markdown table: rows = workloads, columns = libraries, then the ratios."""
    ours = [peer for peer in table.peers if peer.is_pstore]
    main = ours[0]
    present = [reference for name in references for reference in [table.peer(name)]
               if reference is not None]
    header = ["workload", "unit", *(peer.name for peer in table.peers),
              f"{main.name} ÷ best", *(f"÷ {reference.name}" for reference in present),
              *(f"{peer.name} ÷ best" for peer in ours[1:])]
    lines = [header]
    for row in table.rows:
        cells = [row.label, row.unit, *(table.cell(peer, row) for peer in table.peers)]
        ratio_row = row.unit.endswith("/s") or row.unit == "ms"
        for peer in ours:
            best = table.best_peer(peer, row) if ratio_row else None
            cells.append("—" if best is None else f"{best[0]:.2f} {best[1].name}")
            if peer is main:
                cells.extend(format_ratio(table.speedup(main, reference, row))
                             if ratio_row else "—" for reference in present)
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for number, line in enumerate(lines):
        cells = zip(line, widths, strict=True)
        print("| " + " | ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                                for i, (cell, width) in enumerate(cells)) + " |")
        if number == 0:
            print("|" + "|".join("-" * (width + 2) if i < 2 else "-" * (width + 1) + ":"
                                 for i, width in enumerate(widths)) + "|")


#: Issue 14's targets: (what, the row, the peer, the least speedup), and the cold start's.
TARGETS = [
    ("single sets >= 2x diskcache", "single sets", "diskcache", 2.0),
    ("random gets >= 1.5x diskcache", "random gets", "diskcache", 1.5),
    ("random gets >= ZODB", "random gets", "ZODB", 1.0),
    ("bulk write >= ZODB", "bulk write", "ZODB", 1.0),
    ("bulk read-back >= ZODB", "bulk read", "ZODB", 1.0),
    ("shared-graph write time <= ZODB's", "graph write", "ZODB", 1.0),
    ("4-process increments >= 1.5x diskcache, no lost update", "increments", "diskcache", 1.5),
]
COLD_TARGETS = [("import pstore <= 15 ms", "import", 15.0),
                ("the first open adds <= 5 ms", "first open", 5.0)]


def print_targets(table: Table) -> None:
    ours = [peer for peer in table.peers if peer.is_pstore]
    rows = {row.key: row for row in table.rows}
    lines = []
    for what, key, name, least in TARGETS:
        peer = table.peer(name)
        if peer is None or key not in rows:
            continue
        verdicts = []
        for mine in ours:
            ratio = table.speedup(mine, peer, rows[key])
            verdicts.append(f"{mine.name} " + ("not comparable" if ratio is None else
                                               f"{ratio:.2f} "
                                               f"{'met' if ratio >= least else 'NOT met'}"))
        lines.append(f"  {what:56} " + "; ".join(verdicts))
    for what, key, most in COLD_TARGETS:
        if key not in rows:
            continue
        verdicts = []
        for mine in ours:
            seconds = table.seconds(mine, rows[key])
            if seconds is not None:
                verdicts.append(f"{mine.name} {seconds * 1000:.1f} ms "
                                f"{'met' if seconds * 1000 <= most else 'NOT met'}")
        lines.append(f"  {what:56} " + "; ".join(verdicts))
    if lines:
        print("\nissue 14's targets (ratio = how many times faster pstore is):")
        print("\n".join(lines))


def print_notes(table: Table) -> None:
    print("\nfigures: medians of the rounds; ratio = pstore's rate / the peer's (or the peer's "
          "time / pstore's): above 1, pstore is ahead; best = the fastest comparable peer.")
    marked = [peer.name for peer in table.peers if table.sizes.singles_for(peer)
              != table.sizes.singles]
    if marked:
        print(f"*N: {', '.join(marked)} ran the single sets and gets on their first N keys "
              "only (dbm.dumb rewrites its whole index on each commit: N squared; "
              "--dumb-singles 0 runs them all); not comparable, so no ratio.")
    copies = [peer.name for peer in table.peers
              if table.results[peer.name].get("graph shared") is False]
    if copies:
        print(f"(copies): {', '.join(copies)} wrote the shared object once per record (it is "
              "not one object after reopening): another job, so no ratio.")
    print("increments, how each library runs them (each final count checked):")
    for peer in table.peers:
        results = table.results[peer.name]
        if results.get("increments") is None:
            outcome = f"not run: {results.get('increments unavailable')}"
        else:
            lost = results["lost updates"]
            outcome = (f"lost {lost:,} updates (not atomic)" if lost else "no lost update")
        print(f"  {peer.name}: {peer.increments_how}: {outcome}")


def run_rounds(peers: list[Peer], sizes: Sizes, repeat: int) -> Table:
    runs: dict[str, list[dict[str, Any]]] = {peer.name: [] for peer in peers}
    # Round after round of every library, so that a busy moment of the machine does not
    # fall on one library's runs only.
    for _ in range(repeat):
        for peer in peers:
            runs[peer.name].append(run_peer(peer, sizes))
    return Table(peers, sizes, runs)


def run_on_sqlite(peers: list[Peer], sizes: Sizes, repeat: int) -> None:
    table = run_rounds(peers, sizes, repeat)
    print_table(table, ["diskcache", "ZODB"])
    print_targets(table)
    print_notes(table)
    pickle_import = statistics.median(cold_start("import pickle")[0] for _ in range(repeat))
    print(f"\ncold start, for reference: import pickle {pickle_import * 1000:.1f} ms "
          "(same fresh process)")
    print("-X importtime (one fresh process; it adds a cost of its own to each import):")
    for line in importtime_summary(PStore.import_code or "", PStore.open_code):
        print(f"  {line}")


def run_on_postgresql(sizes: Sizes, repeat: int) -> None:
    """The workloads on a throwaway local server: pstore's PostgreSQL backend, RelStorage."""
    from tests.pg import ClusterUnavailable, throwaway_cluster
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(throwaway_cluster())
        except ClusterUnavailable as reason:
            raise Unavailable(f"postgresql: no server can be started here: {reason}") from None
        rounds = 2000
        started = time.perf_counter()
        import psycopg
        with psycopg.connect(server.conninfo(), autocommit=True) as conn:
            for _ in range(rounds):
                conn.execute("SELECT 1").fetchone()
        print(f"\npostgresql (local Unix socket): one round trip "
              f"{(time.perf_counter() - started) / rounds * 1e6:.0f} us")
        peers: list[Peer] = [PStorePostgres(server)]
        try:
            import psycopg2  # noqa: F401
            import relstorage  # noqa: F401
            peers.append(RelStorage(server))
        except ImportError:
            print("skipping RelStorage: relstorage or psycopg2 is not installed")
        table = run_rounds(peers, sizes, repeat)
        print_table(table, ["RelStorage"])
        print_notes(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated peers to compare with ('' for pstore alone, "
                             "e.g. under cProfile)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of every library; the table gives the medians")
    parser.add_argument("--dumb-singles", type=int, default=None,
                        help="single sets and gets on dbm.dumb peers (default 2,000; "
                             "0: as many as the others)")
    parser.add_argument("--backends", default="sqlite",
                        help="comma-separated: sqlite (against --peers), postgresql (on a "
                             "throwaway local server, against ZODB + RelStorage)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    sizes = QUICK if args.quick else Sizes()
    if args.dumb_singles is not None:
        sizes = Sizes(**{**sizes.__dict__, "dumb_singles": args.dumb_singles})
    print(f"pstore from {os.path.dirname(pstore.__file__)}; Python "
          f"{sys.version.split()[0]}; {os.cpu_count()} cores; medians of {args.repeat} rounds")
    print("durability: every commit survives the process being killed (see the docstring)\n")
    try:
        for backend in args.backends.split(","):
            if backend == "sqlite":
                run_on_sqlite(available_peers(args.peers.split(",")), sizes, args.repeat)
            elif backend == "postgresql":
                run_on_postgresql(sizes, args.repeat)
            else:
                parser.error(f"unknown backend {backend!r}")
    except WrongResult as error:
        print(f"\nwrong result: {error}", file=sys.stderr)
        return 1
    except Unavailable as reason:
        print(f"\n{reason}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
