"""pstore against shelve (dbm.dumb), sqlitedict, diskcache and ZODB (FileStorage).

    python3 benchmarks/store.py            # the full run
    python3 benchmarks/store.py --quick    # a smoke run with small sizes
    python3 benchmarks/store.py --repeat 3 # best of three runs of each library
    python3 -m cProfile -s tottime benchmarks/store.py --peers ''   # pstore alone, profiled
    python3 benchmarks/store.py --backends postgresql   # on a local PostgreSQL server, against
                                                        # ZODB + RelStorage on the same server

Durability, the same for every library: a commit that returned survives the
process being killed, not necessarily a power loss. pstore: WAL,
synchronous=NORMAL (its default); sqlitedict: WAL, synchronous=NORMAL;
diskcache: WAL, synchronous=NORMAL (its default); shelve: dbm.dumb, ``sync()``
after each commit (writes to the OS, never fsyncs); ZODB: FileStorage with its per-commit fsync
switched off (it still writes each commit to the OS before returning).

Workloads: (1) single sets of small records, one commit each; (2) single gets
of those records from a freshly opened store; (3) a bulk set of many records in
one transaction and (4) their read-back by iterating the items; (5) a graph of
records sharing one 10 KB object: the time to write it, the bytes on disk, and
whether the shared object is one object after reopening; (6) a graph of
Persistent objects (pstore.Persistent, ZODB's persistent.Persistent; the
libraries that have them) in which most nodes have two parents: the time to
store it under one key, to open that key in a fresh process state and read
one attribute (lazy loading: one record), to walk the whole graph from it, and
to commit a change to 1% of its nodes (writes only those). Ratios are
``peer time / pstore time``: above 1 means pstore is faster. Peers that are not
installed (``pip install pstore[bench]``) are skipped.

``--backends postgresql`` starts a throwaway PostgreSQL cluster (tests/pg.py: Unix
socket only) and runs the same workloads with pstore's PostgreSQL backend against ZODB
on RelStorage (history-free, psycopg2) on that server, plus (7) a counter that 4
processes increment in read-modify-write transactions (pstore: the write lock; ZODB:
conflicts retried). Both commit to the server's disk (synchronous_commit on; the
throwaway cluster itself runs with fsync off). It prints the latency of one round trip.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import time
import types
from collections.abc import Callable
from typing import Any

import pstore

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
    return {"id": i, "name": f"record-{i}", "tags": ["a", "b"], "score": i * 0.5}


class Peer:
    """One library, behind the operations the workloads need."""

    name = ""

    def open(self, directory: str) -> None: ...
    def close(self) -> None: ...
    def set_one(self, key: str, value: Any) -> None: ...      # committed when it returns
    def get(self, key: str) -> Any: ...
    def set_many(self, items: Any) -> None: ...                # one transaction
    def items(self) -> Any: ...
    def make_shared(self, size: int) -> Any:
        """The shared object of the graph workload; a stdlib class, so that it pickles by
        the same name however this script is run (e.g. under cProfile)."""
        return types.SimpleNamespace(payload=b"x" * size)

    #: The class of the Persistent graph's nodes; None: the library has no Persistent objects.
    node_class: type | None = None

    def commit(self) -> None:
        """Commit the changes made to Persistent objects."""


class PStore(Peer):
    name = "pstore"
    node_class = PStoreNode

    def open(self, directory: str) -> None:
        self.store = pstore.open(os.path.join(directory, "data.db"))

    def close(self) -> None:
        self.store.close()

    def set_one(self, key: str, value: Any) -> None:
        self.store[key] = value

    def get(self, key: str) -> Any:
        return self.store[key]

    def set_many(self, items: Any) -> None:
        with self.store.transaction():
            for key, value in items:
                self.store[key] = value

    def items(self) -> Any:
        return self.store.items()

    def commit(self) -> None:
        self.store.sync()


class PStoreDBM(PStore):
    """pstore's DBM backend, on the dbm module the shelve peer uses (dbm.dumb)."""

    name = "pstore-dbm"

    def open(self, directory: str) -> None:
        self.store = pstore.open(os.path.join(directory, "data"), backend="dbm:dbm.dumb")


class Shelve(Peer):
    name = "shelve"

    def open(self, directory: str) -> None:
        import dbm.dumb
        import shelve
        self.shelf = shelve.Shelf(dbm.dumb.open(os.path.join(directory, "data"), "c"))

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


class SqliteDict(Peer):
    name = "sqlitedict"

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


class DiskCache(Peer):
    name = "diskcache"

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


class Zodb(Peer):
    name = "ZODB"

    def open(self, directory: str) -> None:
        import BTrees.OOBTree
        import transaction
        import ZODB
        import ZODB.FileStorage
        # FileStorage fsyncs every commit; without its fsync it still writes every commit
        # to the OS before returning, which is the durability every peer here runs at.
        ZODB.FileStorage.FileStorage.fsync = None
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
        import ZODB.FileStorage
        return ZODB.FileStorage.FileStorage(os.path.join(directory, "data.fs"))

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

    node_class = ZodbNode if persistent is not None else None

    def commit(self) -> None:
        self.transaction.commit()


def store_name(directory: str) -> str:
    """A store (or database) name for the run in ``directory``: its folder's name."""
    return "".join(c if c.isalnum() else "_" for c in os.path.basename(directory).lower())


class PStorePostgres(PStore):
    """pstore's PostgreSQL backend: one store per run directory, on the benchmark's server."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def open(self, directory: str) -> None:
        self.store = pstore.open(self.server.location(store_name(directory)))

    def bytes_used(self, directory: str) -> int:
        return self.server.query(
            "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind IN ('r', 'm')", (store_name(directory),))

    def increment(self, times: int) -> None:
        for _ in range(times):
            with self.store.transaction():
                self.store["counter"] = self.store["counter"] + 1


class RelStorage(Zodb):
    """ZODB on RelStorage (history-free), one database per run directory, on the same server."""

    name = "RelStorage"

    def __init__(self, server: Any) -> None:
        self.server = server

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

    def increment(self, times: int) -> None:
        for _ in range(times):
            for attempt in self.transaction.manager.attempts(1000):
                with attempt:
                    self.tree["counter"] = self.tree["counter"] + 1


def _increment_in_process(peer_class: type, server: Any, directory: str, times: int) -> None:
    peer = peer_class(server)
    peer.open(directory)
    try:
        peer.increment(times)  # type: ignore[attr-defined]
    finally:
        peer.close()


def run_counter(peer: Peer, processes: int, times: int) -> float:
    """Workload (7): ``processes`` processes each increment one counter ``times`` times."""
    import multiprocessing
    spawn = multiprocessing.get_context("spawn")
    directory = tempfile.mkdtemp(prefix=f"bench-{peer.name}-")
    try:
        peer.open(directory)
        peer.set_one("counter", 0)
        peer.close()
        workers = [spawn.Process(target=_increment_in_process,
                                 args=(type(peer), peer.server, directory, times))
                   for _ in range(processes)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds = time.perf_counter() - start
        assert [worker.exitcode for worker in workers] == [0] * processes, peer.name
        peer.open(directory)
        assert peer.get("counter") == processes * times, (peer.name, peer.get("counter"))
        peer.close()
    finally:
        shutil.rmtree(directory)
    return seconds


def available_peers(wanted: list[str]) -> list[Peer]:
    """pstore, then each wanted peer whose module is installed."""
    peers: list[Peer] = [PStore()]
    for module, peer in (("dbm.dumb", PStoreDBM), ("shelve", Shelve), ("sqlitedict", SqliteDict),
                         ("diskcache", DiskCache), ("ZODB", Zodb)):
        if peer.name not in wanted:
            continue
        try:
            __import__(module)
        except ImportError:
            print(f"skipping {peer.name}: {module} is not installed")
            continue
        peers.append(peer())
    return peers


def disk_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(directory) for name in names)


def timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def run_peer(peer: Peer, sizes: dict[str, int]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    directory = tempfile.mkdtemp(prefix=f"bench-{peer.name}-")
    try:
        singles = sizes["single"]
        peer.open(directory)
        results["single set"] = timed(lambda: [peer.set_one(f"k{i}", small(i))
                                               for i in range(singles)])
        peer.close()
        peer.open(directory)
        results["single get"] = timed(lambda: [peer.get(f"k{i}") for i in range(singles)])
        peer.close()
    finally:
        shutil.rmtree(directory)

    directory = tempfile.mkdtemp(prefix=f"bench-{peer.name}-")
    try:
        bulk = sizes["bulk"]
        peer.open(directory)
        results["bulk set"] = timed(lambda: peer.set_many((f"k{i}", small(i))
                                                          for i in range(bulk)))
        peer.close()
        peer.open(directory)
        count = 0

        def read_back() -> None:
            nonlocal count
            count = sum(1 for _ in peer.items())
        results["bulk read"] = timed(read_back)
        assert count == bulk, (peer.name, count)
        peer.close()
    finally:
        shutil.rmtree(directory)

    directory = tempfile.mkdtemp(prefix=f"bench-{peer.name}-")
    try:
        graph = sizes["graph"]
        peer.open(directory)
        shared = peer.make_shared(10_000)

        def write_graph() -> None:
            peer.set_one("shared", shared)
            peer.set_many((f"r{i}", {"id": i, "shared": shared}) for i in range(graph))
        results["graph set"] = timed(write_graph)
        peer.close()
        results["graph bytes"] = getattr(peer, "bytes_used", disk_bytes)(directory)
        peer.open(directory)
        first = peer.get("shared")
        results["graph shared"] = all(peer.get(f"r{i}")["shared"] is first
                                      for i in range(graph))
        peer.close()
    finally:
        shutil.rmtree(directory)
    if peer.node_class is not None:
        results.update(run_persistent_graph(peer, sizes["persistent"]))
    if hasattr(peer, "increment"):
        results["counter x4"] = run_counter(peer, 4, sizes["counter"])
    return results


def run_persistent_graph(peer: Peer, size: int) -> dict[str, Any]:
    """Workload (6): store a graph of ``size`` Persistent nodes, open it, walk it, change 1%."""
    results: dict[str, Any] = {}
    directory = tempfile.mkdtemp(prefix=f"bench-{peer.name}-")
    try:
        peer.open(directory)
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
        assert len(nodes) == size, (peer.name, len(nodes))

        def change_some() -> None:
            for node in nodes[::100]:
                node.name += "!"
            peer.commit()
        results["pgraph update"] = timed(change_some)
        peer.close()
        peer.open(directory)
        assert sum(node.name.endswith("!") for node in walk_graph(peer.get("pgraph"))) == \
            len(nodes[::100]), peer.name
        peer.close()
    finally:
        shutil.rmtree(directory)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--peers", default="pstore-dbm,shelve,sqlitedict,diskcache,ZODB",
                        help="comma-separated peers to compare with ('' for pstore alone, "
                             "e.g. under cProfile)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each library this many times and keep its best times")
    parser.add_argument("--backends", default="sqlite",
                        help="comma-separated: sqlite (against --peers), postgresql (on a "
                             "throwaway local server, against ZODB + RelStorage)")
    args = parser.parse_args()
    sizes = ({"single": 200, "bulk": 5_000, "graph": 100, "persistent": 1_000, "counter": 25}
             if args.quick else
             {"single": 2_000, "bulk": 100_000, "graph": 1_000, "persistent": 10_000,
              "counter": 250})
    print(f"sizes: {sizes['single']} single sets/gets, {sizes['bulk']} bulk records, "
          f"graph of {sizes['graph']} records sharing a 10 KB object, "
          f"graph of {sizes['persistent']} Persistent objects")
    print("durability: every commit survives the process being killed (see the docstring)\n")

    for backend in args.backends.split(","):
        if backend == "sqlite":
            print_table(available_peers(args.peers.split(",")), sizes, args.repeat)
        elif backend == "postgresql":
            run_on_postgresql(sizes, args.repeat)
        else:
            parser.error(f"unknown backend {backend!r}")


def run_on_postgresql(sizes: dict[str, int], repeat: int) -> None:
    """The workloads on a throwaway local server: pstore's PostgreSQL backend, RelStorage."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests.pg import throwaway_cluster
    with throwaway_cluster() as server:
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
        print_table(peers, sizes, repeat)


def print_table(peers: list[Peer], sizes: dict[str, int], repeat: int) -> None:
    """Run every workload on ``peers`` ``repeat`` times; print the best times, as ratios to
    the first peer's (pstore)."""
    timings = ["single set", "single get", "bulk set", "bulk read", "graph set", "pgraph store",
               "pgraph open", "pgraph walk", "pgraph update", "counter x4"]
    runs: dict[str, list[dict[str, Any]]] = {peer.name: [] for peer in peers}
    # Round after round of every library, so that a busy moment of the machine does not
    # fall on one library's runs only; each keeps its best time per workload.
    for _ in range(repeat):
        for peer in peers:
            runs[peer.name].append(run_peer(peer, sizes))
    table = {name: {**results[0], **{workload: min(run[workload] for run in results)
                                     for workload in timings if workload in results[0]}}
             for name, results in runs.items()}
    ours = table[peers[0].name]
    header = f"{'':13}" + "".join(f"{name:>18}" for name in table)
    print(header)
    for workload in timings:
        cells = []
        for name, results in table.items():
            seconds = results.get(workload)
            if seconds is None:     # a library without Persistent objects, or one process
                cells.append("-")
                continue
            ratio = "" if name == peers[0].name else f" ({seconds / ours[workload]:5.1f}x)"
            cells.append(f"{seconds * 1000:9.1f}ms{ratio}")
        print(f"{workload:13}" + "".join(f"{cell:>18}" for cell in cells))
    for label, workload in (("graph bytes", "graph bytes"), ("pgraph bytes", "pgraph bytes")):
        print(f"{label:13}" + "".join(f"{results[workload]:>18,}" if workload in results
                                      else f"{'-':>18}" for results in table.values()))
    print(f"{'shared once':13}" + "".join(f"{str(results['graph shared']):>18}"
                                          for results in table.values()))
    print("\n(x) = peer time / pstore time: above 1 means pstore is faster.")


if __name__ == "__main__":
    main()
