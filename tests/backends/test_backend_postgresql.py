"""The PostgreSQL backend on a real server (the session's cluster, tests/pg.py): URLs and
flags, blobs in the database, the write lock and its holder, real processes, SIGKILL,
dropped connections and a server restart under an open Store."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pstore
from pstore.backends import open_backend
from pstore.backends.blobs import blob_digest
from pstore.errors import (
    ConnectionLostError,
    FormatError,
    LockTimeoutError,
    ReadOnlyError,
    ServerLockTimeoutError,
)

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")
from pstore.backends import postgresql  # noqa: E402 (after the skip)
from pstore.backends.postgresql import BLOB_CHUNK, REFERRERS, parse_location  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def url(pg_server) -> str:
    return pg_server.location()


@pytest.fixture
def opened():
    """open(url, flag="c", **options) -> a PostgreSQLBackend, closed after the test."""
    backends = []

    def open_(url: str, flag: str = "c", *, lock_timeout: float = 10.0):
        backend = open_backend("postgresql", url, flag, lock_timeout=lock_timeout, fsync=False)
        backends.append(backend)
        return backend

    yield open_
    for backend in backends:
        backend.close()


def sql(pg_server, statement: str, params=()) -> list[tuple]:
    """Rows of ``statement`` on a connection of the test's own (as the superuser)."""
    with psycopg.connect(pg_server.conninfo(), autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def write(backend, fn):
    backend.begin()
    try:
        result = fn()
    except BaseException:
        backend.rollback()
        raise
    backend.commit()
    return result


# -- URLs and flags -------------------------------------------------------------------------

def test_the_url_names_the_store_and_passwords_never_show():
    params, store, shown = parse_location(
        "postgresql://ann:s3cret@db.example:5433/app?store=cache&sslmode=disable")
    assert store == "cache" and params["password"] == "s3cret" and params["dbname"] == "app"
    assert "store" not in params and params["sslmode"] == "disable"
    assert "s3cret" not in shown and shown.startswith("postgresql://ann@db.example:5433/app")
    params, store, shown = parse_location("postgresql:///app?host=/run/pg&password=s3cret")
    assert store == "pstore" and params["host"] == "/run/pg" and "s3cret" not in shown
    plain = "postgresql://ann@/app?host=/run/pg&store=x"
    assert parse_location(plain)[2] == plain    # shown as given when it has no password
    for bad in ("postgresql://ann:s3cret@/app?store=Upper", "postgresql://ann:s3cret@/app?store=pg_x",
                "postgresql://ann:s3cret@/app?store=a&store=b", "mysql://ann:s3cret@h/db",
                "postgresql:///app?password=s3cret&store=9lives"):
        with pytest.raises(ValueError, match="store|PostgreSQL URL") as raised:
            parse_location(bad)
        assert "s3cret" not in str(raised.value)


def test_a_failed_connection_is_a_clear_error_without_the_password(tmp_path):
    url = f"postgresql://ann:s3cret@/app?host={tmp_path}&port=1&store=s"
    with pytest.raises(ConnectionLostError) as raised:
        pstore.open(url, lock_timeout=1)
    error = raised.value
    assert isinstance(error, ConnectionError) and isinstance(error, pstore.Error)
    assert "s3cret" not in str(error) and "s3cret" not in repr(error.args)
    assert str(tmp_path) in str(error)      # libpq's reason: the socket it tried
    assert pickle.loads(pickle.dumps(error)).args == error.args


def test_the_scheme_implies_the_backend_and_repr_hides_the_password(pg_server):
    url = pg_server.location().replace("postgres@", "postgres:s3cret@")   # trust: ignored
    with pstore.open(url) as store:
        store["k"] = [1]
        assert "s3cret" not in repr(store) and "s3cret" not in store.path
        assert "s3cret" not in repr(store._backend)
        assert store["k"] == [1]


def test_flag_c_creates_a_schema_named_after_the_store(pg_server, opened):
    url = pg_server.location("flag_c_store")
    opened(url).close()
    tables = sql(pg_server, "SELECT table_name FROM information_schema.tables"
                            " WHERE table_schema = 'flag_c_store' ORDER BY 1")
    assert [name for (name,) in tables] == ["blob_chunks", "blobs", "keys", "meta", "records",
                                            "state"]
    opened(url, "c").close()    # opening again keeps it


def test_flags_r_and_w_require_the_store_and_r_writes_nothing(pg_server, url, opened):
    for flag in "rw":
        with pytest.raises(FileNotFoundError, match="no pstore store"):
            opened(url, flag)
    assert sql(pg_server, "SELECT to_regnamespace(%s)", (parse_location(url)[1],)) == [(None,)]
    backend = opened(url)
    write(backend, lambda: backend.bind_key("k", backend.new_oid()))
    reader = opened(url, "r")
    with pytest.raises(ReadOnlyError):
        reader.begin()
    store = parse_location(url)[1]
    before = sql(pg_server, f"SELECT xmin::text, commits FROM {store}.state")
    assert reader.get_key("k") is not None and reader.count_keys() == 1
    # The server refuses writes in that session too.
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        reader._execute("delete_records", ([1],))
    assert sql(pg_server, f"SELECT xmin::text, commits FROM {store}.state") == before


def test_flag_n_empties_the_store_and_moves_the_marker(url, opened):
    backend = opened(url)
    name = write(backend, lambda: backend.put_blob([b"x" * 10]))
    write(backend, lambda: backend.bind_key("k", backend.new_oid()))
    marker = backend.change_marker()
    fresh = opened(url, "n")
    assert fresh.count_keys() == 0 and fresh.blob_names() == set()
    assert backend.change_marker() != marker and backend.get_key("k") is None
    assert name not in backend.blob_names()


def test_a_schema_of_something_else_is_a_format_error(pg_server, opened):
    sql(pg_server, "CREATE SCHEMA foreign_app; CREATE TABLE foreign_app.users (id int)")
    for flag in "rwcn":
        with pytest.raises(FormatError, match="not a pstore store"):
            opened(pg_server.location("foreign_app"), flag)
    sql(pg_server, "CREATE SCHEMA newer; CREATE TABLE newer.meta (name text, value text);"
                   " INSERT INTO newer.meta VALUES ('format', 'pstore-postgresql'),"
                   " ('version', '99')")
    with pytest.raises(FormatError, match="version 99"):
        opened(pg_server.location("newer"), "r")
    assert sql(pg_server, "SELECT count(*) FROM foreign_app.users") == [(0,)]


def test_psycopg_missing_names_the_extra_to_install(url):
    script = ("import sys; sys.modules['psycopg'] = None\n"
              "import pstore\n"
              f"try:\n    pstore.open({url!r})\n"
              "except ModuleNotFoundError as error:\n    print(error)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=60, check=False)
    assert "pip install pstore[postgresql]" in out.stdout, out.stderr


# -- blobs ----------------------------------------------------------------------------------

def test_blobs_are_content_addressed_chunked_and_stored_once(pg_server, url, opened):
    backend = opened(url)
    data = os.urandom(2 * BLOB_CHUNK + 12345)
    pieces = [data[:7], memoryview(data)[7:BLOB_CHUNK + 3], data[BLOB_CHUNK + 3:]]
    name = write(backend, lambda: backend.put_blob(pieces))
    assert name == blob_digest(data)    # the file backends' digest
    assert write(backend, lambda: backend.put_blob([data])) == name
    store = parse_location(url)[1]
    assert sql(pg_server, f"SELECT count(*), max(length(data)) FROM {store}.blob_chunks") \
        == [(3, BLOB_CHUNK)]
    assert backend.blob_names() == {name}
    loaded = backend.get_blob(name, len(data), writable=True)
    assert bytes(loaded) == data
    loaded[0] ^= 1      # a private buffer: the stored blob is unchanged
    frozen = backend.get_blob(name, len(data), writable=False)
    assert bytes(frozen) == data and memoryview(frozen).readonly
    assert b"".join(backend.read_blob(name)) == data
    empty = write(backend, lambda: backend.put_blob([]))
    assert bytes(backend.get_blob(empty, 0, writable=False)) == b""


def test_a_rolled_back_or_failed_blob_leaves_nothing(pg_server, url, opened):
    backend = opened(url)
    kept = write(backend, lambda: backend.put_blob([b"kept" * 100]))
    backend.begin()
    backend.put_blob([b"dropped" * 100])
    backend.rollback()

    def failing():
        yield b"a" * (BLOB_CHUNK + 1)
        raise OSError("the source broke")
    backend.begin()
    with pytest.raises(OSError, match="source broke"):
        backend.put_blob(failing())
    backend.commit()
    assert backend.blob_names() == {kept}
    store = parse_location(url)[1]
    assert sql(pg_server, f"SELECT count(*) FROM {store}.blobs") == [(1,)]


def test_a_missing_wrong_sized_or_truncated_blob_is_a_format_error(pg_server, url, opened):
    backend = opened(url)
    name = write(backend, lambda: backend.put_blob([b"x" * 100]))
    with pytest.raises(FormatError, match="holds 100 bytes, its record says 99"):
        backend.get_blob(name, 99, writable=False)
    store = parse_location(url)[1]
    sql(pg_server, f"UPDATE {store}.blob_chunks SET data = 'short'::bytea")
    with pytest.raises(FormatError, match="chunks of 5 bytes"):
        backend.get_blob(name, 100, writable=False)
    sql(pg_server, f"UPDATE {store}.blob_chunks SET data = decode(repeat('00', 200), 'hex')")
    with pytest.raises(FormatError, match="more chunks than its size"):
        backend.get_blob(name, 100, writable=False)
    with pytest.raises(FormatError, match=f"blob {'0' * 64} is missing"):
        backend.get_blob("0" * 64, 100, writable=False)
    with pytest.raises(FormatError, match="is missing"):
        list(backend.read_blob("0" * 64))


def test_gc_deletes_the_blobs_and_chunks_no_live_record_names(pg_server, url, opened):
    backend = opened(url)

    def setup():
        names = [backend.put_blob([bytes([i]) * 1000]) for i in range(3)]
        live, dead = backend.new_oid(), backend.new_oid()
        backend.put_record(live, b"live", (), blobs=names[:2])
        backend.put_record(dead, b"dead", (), blobs=names[1:])
        backend.bind_key("live", live)
        return names
    names = write(backend, setup)
    assert write(backend, backend.gc) == 1
    assert backend.blob_names() == set(names[:2])
    write(backend, lambda: backend.put_record(backend.get_key("live"), b"live", ()))
    write(backend, backend.gc)
    store = parse_location(url)[1]
    assert backend.blob_names() == set()
    assert sql(pg_server, f"SELECT count(*) FROM {store}.blob_chunks") == [(0,)]


def test_arrays_round_trip_through_the_store_and_equal_ones_are_stored_once(url):
    np = pytest.importorskip("numpy")
    data = np.arange(500_000, dtype="float64")      # 4 MB: several chunks
    with pstore.open(url) as store:
        store["a"] = data
        store["b"] = data.copy()
        store["small"] = np.arange(10)
        assert store._backend.blob_names() == {blob_digest(data)}
    with pstore.open(url, "r") as store:
        loaded = store["a"]
        assert np.array_equal(loaded, data) and loaded.flags.writeable   # a private copy
        assert np.array_equal(store["b"], data) and store["small"].tolist() == list(range(10))
    with pstore.open(url, "r", readonly_buffers=True) as store:
        assert not store["a"].flags.writeable
    with pstore.open(url, compression="zlib") as store:
        store["z"] = np.zeros(1_000_000)
        assert np.array_equal(store["z"], np.zeros(1_000_000))


# -- the write lock -------------------------------------------------------------------------

def test_a_lock_timeout_names_the_holding_session(url, opened):
    holder = opened(url)
    waiter = opened(url, lock_timeout=0.2)
    holder.begin()
    try:
        started = time.monotonic()
        with pytest.raises(LockTimeoutError) as raised:
            waiter.begin()
        assert time.monotonic() - started >= 0.2
        error = raised.value
        assert isinstance(error, ServerLockTimeoutError)
        pid = holder._conn.info.backend_pid
        assert (error.pid, error.application_name, error.address) == (pid, "pstore",
                                                                      "local socket")
        assert f"server process {pid}" in str(error) and error.path == waiter.path
        assert pickle.loads(pickle.dumps(error)).args == error.args
        assert waiter.get_key("k") is None      # the waiter's connection is usable
    finally:
        holder.rollback()
    waiter.begin()
    waiter.rollback()


def test_readers_never_wait_for_a_writer_and_see_its_commit_next(url, opened):
    writer = opened(url)
    oid = write(writer, lambda: (writer.bind_key("k", o := writer.new_oid()),
                                 writer.put_record(o, b"old", ()), o)[2])
    reader = opened(url, "r", lock_timeout=0.1)
    marker = reader.change_marker()
    writer.begin()
    writer.put_record(oid, b"new", ())
    assert reader.get_record(oid) == b"old" and reader.change_marker() == marker
    writer.commit()
    assert reader.get_record(oid) == b"new" and reader.change_marker() != marker
    # The writer's own commits do not move its own marker.
    own = writer.change_marker()
    write(writer, lambda: writer.put_record(oid, b"newer", ()))
    assert writer.change_marker() == own


def test_a_killed_client_inside_a_transaction_rolls_back_and_frees_the_lock(url, opened):
    backend = opened(url)
    write(backend, lambda: backend.bind_key("before", backend.new_oid()))
    script = (
        "import sys, time\n"
        "from pstore.backends import open_backend\n"
        f"b = open_backend('postgresql', {url!r}, 'w', lock_timeout=10, fsync=False)\n"
        "b.begin()\n"
        "b.bind_key('uncommitted', b.new_oid())\n"
        "print('holding', flush=True)\n"
        "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        assert child.stdout.readline() == "holding\n"
        with pytest.raises(LockTimeoutError):
            opened(url, lock_timeout=0.2).begin()
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    # The server sees the socket close, rolls back and releases the lock.
    after = opened(url, lock_timeout=30)
    after.begin()
    after.rollback()
    assert after.get_key("uncommitted") is None and after.get_key("before") is not None


# -- dropped connections --------------------------------------------------------------------

def test_a_terminated_connection_is_a_clear_error_and_the_store_reconnects(pg_server, url):
    with pstore.open(url) as store:
        store["k"] = [1]
        sql(pg_server, "SELECT pg_terminate_backend(%s)", (store._backend._conn.info.backend_pid,))
        with pytest.raises(ConnectionLostError, match="lost the connection") as raised:
            store["k"]
        assert raised.value.path == url
        assert store["k"] == [1]        # the next call connects again
        with pytest.raises(ConnectionLostError), store.transaction():
            store["l"] = [2]
            sql(pg_server, "SELECT pg_terminate_backend(%s)",
                (store._backend._conn.info.backend_pid,))
            store["m"] = [3]
        assert "l" not in store and "m" not in store    # the server rolled it back
    with pstore.open(url, "r") as store:
        assert dict(store.items()) == {"k": [1]}


def test_pages_asked_for_ahead_answer_every_statement_between_them(url):
    """Outside a write transaction, iteration asks for its next page before it yields
    this one (a statement sent ahead, in pipeline mode): any other statement in between
    -- gets, writes, transactions, snapshots, another iteration -- runs after its answer
    arrives, and every page comes whole and in order."""
    count = 2 * postgresql.KEY_BATCH + 10
    with pstore.open(url) as store:
        store.update({f"k{i:05}": [i] for i in range(count)})
        items = store.items()
        seen = []
        for key, value in items:
            seen.append(key)
            i = int(key[1:])
            assert value == [i]
            if i % 250 == 0:
                assert store[f"k{count - 1 - i:05}"] == [count - 1 - i]     # a get
                store[f"extra{i}"] = i                                      # a write
                with store.transaction():
                    store[f"extra{i}"] = i + 1
                with store.snapshot():
                    assert store[f"extra{i}"] == i + 1
                assert next(iter(store.keys())) == "extra0"     # another iteration
        assert seen[:count] == [f"k{i:05}" for i in range(count)]
        # Left after its first page (a page asked for ahead, never read): the store goes
        # on, and closes.
        partial = iter(store.items())
        next(partial)
        assert store["k00003"] == [3]
        assert len(list(store.keys())) == count + 9
        partial = iter(store.values())
        next(partial)
    with pstore.open(url, "r") as store:
        assert store["extra500"] == 501


def test_a_change_sent_ahead_that_fails_fails_the_commit_and_changes_nothing(pg_server, url):
    """A transaction's queued changes are sent without waiting once 1000 are queued; the
    server refusing one (here a trigger of the test's) fails the transaction's next
    statement or its commit: nothing of it is committed, and the store goes on."""
    count = 3 * postgresql.QUEUE_RECORDS
    with pstore.open(url) as store:
        store["before"] = 1
        schema = store._backend._schema
        sql(pg_server, f"""
            CREATE FUNCTION {schema}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF position('refused' in encode(NEW.data, 'escape')) > 0 THEN
                    RAISE EXCEPTION 'the test refuses this record';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse BEFORE INSERT ON {schema}.records
                FOR EACH ROW EXECUTE FUNCTION {schema}.refuse();""")
        with pytest.raises(psycopg.Error, match="the test refuses this record"):
            with store.transaction():
                for i in range(count):
                    store[f"k{i}"] = "refused" if i == 10 else i
        assert list(store) == ["before"]
        sql(pg_server, f"DROP TRIGGER refuse ON {schema}.records")
        with store.transaction():
            for i in range(count):
                store[f"k{i}"] = i
    with pstore.open(url, "r") as store:
        assert len(store) == count + 1 and store[f"k{count - 1}"] == count - 1


def test_a_connection_lost_with_a_page_asked_for_ahead(pg_server, url):
    count = postgresql.KEY_BATCH + 10
    with pstore.open(url) as store:
        store.update({f"k{i:05}": i for i in range(count)})
        pages = iter(store.items())
        assert next(pages) == ("k00000", 0)     # the second page is asked for already
        sql(pg_server, "SELECT pg_terminate_backend(%s)",
            (store._backend._conn.info.backend_pid,))
        with pytest.raises(ConnectionLostError, match="lost the connection"):
            for _ in pages:
                pass
        assert store["k00001"] == 1             # the next call connects again
        assert dict(store.items()) == {f"k{i:05}": i for i in range(count)}


def test_a_connection_lost_in_a_snapshot_fails_its_reads_until_it_ends(pg_server, url):
    with pstore.open(url) as store:
        store.update({f"k{i}": [i] for i in range(5)})
        with store.snapshot():
            assert store["k0"] == [0]
            sql(pg_server, "SELECT pg_terminate_backend(%s)",
                (store._backend._conn.info.backend_pid,))
            with pytest.raises(ConnectionLostError, match="lost the connection"):
                store["k4"]
            # A new connection could not see the snapshot's state: the block's reads that
            # need the server keep failing instead of reading a later state.
            for key in ("k3", "k4"):
                with pytest.raises(ConnectionLostError):
                    store[key]
        assert store["k4"] == [4]       # after the block, the next call connects again
        with store.snapshot():
            assert [store[f"k{i}"] for i in range(5)] == [[i] for i in range(5)]


def test_a_server_restart_under_an_open_store(pg_server, url):
    store = pstore.open(url)
    try:
        store["k"] = {"v": 1}
        held = store["k"]
        pg_server.restart()
        with pytest.raises(ConnectionLostError):
            store["k"]
        assert store["k"] is held       # nobody else committed: the identity map is kept
        store["k2"] = {"v": 2}
        with pstore.open(url, "r") as other:
            assert dict(other.items()) == {"k": {"v": 1}, "k2": {"v": 2}}
    finally:
        store.close()


# -- what a write transaction knows ---------------------------------------------------------

_KEYS = st.sampled_from(["a", "b", "c", "d", "e"])
_OIDS = st.integers(1, 6)
_ACTIONS = st.one_of(
    st.tuples(st.just("bind"), _KEYS, _OIDS), st.tuples(st.just("unbind"), _KEYS),
    st.tuples(st.just("get_key"), _KEYS), st.tuples(st.just("get_item"), _KEYS),
    st.tuples(st.just("put"), _OIDS, st.frozensets(_OIDS, max_size=3)),
    st.tuples(st.just("delete"), _OIDS), st.tuples(st.just("is_referenced"), _OIDS),
    st.tuples(st.just("existing"), st.frozensets(_OIDS)), st.tuples(st.just("get_record"), _OIDS))
_TRANSACTIONS = st.lists(st.tuples(st.integers(0, 1), st.lists(_ACTIONS, max_size=12),
                                   st.booleans()), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(transactions=_TRANSACTIONS)
def test_write_transactions_of_two_connections_answer_as_a_model_does(
        pg_server, monkeypatch, transactions):
    """Keys and records answered from what a transaction knows, bind_key learning a few
    bindings per query (KEY_BATCH 2, so ranges end), is_referenced answering the released
    ids together: every answer is the model's, whichever connection committed last."""
    monkeypatch.setattr(postgresql, "KEY_BATCH", 2)
    url = pg_server.location()
    backends = [open_backend("postgresql", url, "c", lock_timeout=10.0, fsync=False)
                for _ in range(2)]
    try:
        _follow_the_model(backends, transactions)
    finally:
        for backend in backends:
            backend.close()


def _follow_the_model(backends, transactions):
    keys: dict[str, int] = {}
    records: dict[int, tuple[bytes, frozenset]] = {}
    version = 0
    for which, actions, commits in transactions:
        backend = backends[which]
        saved = dict(keys), dict(records)
        backend.begin()
        for action, *args in actions:
            if action == "bind":
                key, oid = args
                assert backend.bind_key(key, oid) == keys.get(key)
                keys[key] = oid
            elif action == "unbind":
                assert backend.unbind_key(args[0]) == keys.pop(args[0], None)
            elif action == "get_key":
                assert backend.get_key(args[0]) == keys.get(args[0])
            elif action == "get_item":
                oid = keys.get(args[0])
                expected = None if oid is None else (oid, records.get(oid, (None,))[0])
                item = backend.get_item(args[0])
                assert (None if item is None else tuple(item)) == expected
            elif action == "put":
                oid, refs = args
                version += 1
                records[oid] = (f"{oid}.{version}".encode(), refs)
                backend.put_record(oid, records[oid][0], refs)
            elif action == "delete":
                backend.delete_record(args[0])
                records.pop(args[0], None)
            elif action == "is_referenced":
                oid = args[0]
                assert backend.is_referenced(oid) == (
                    oid in keys.values() or any(oid in refs for _, refs in records.values()))
            elif action == "existing":
                assert backend.existing(args[0]) == args[0] & records.keys()
            else:
                assert backend.get_record(args[0]) == records.get(args[0], (None,))[0]
        if commits:
            backend.commit()
        else:
            backend.rollback()
            keys, records = saved
        # The other connection, outside a transaction, reads what was committed.
        other = backends[1 - which]
        assert {key: other.get_key(key) for key in "abcde"} == {
            key: keys.get(key) for key in "abcde"}
        assert {oid: other.get_record(oid) for oid in range(1, 7)} == {
            oid: records.get(oid, (None,))[0] for oid in range(1, 7)}


def test_a_transaction_answers_what_it_knows_without_the_server(pg_server, url, opened):
    """No round trip on a get whose freshness is known: with its connection terminated, a
    transaction still answers the keys and records it read or wrote, and the keys of a
    range it learnt; what it does not know is a lost connection."""
    backend = opened(url)
    write(backend, lambda: (backend.bind_key("held", 7), backend.put_record(7, b"seven", ())))
    backend.begin()
    assert tuple(backend.get_item("held")) == (7, b"seven")
    assert backend.bind_key("m", 8) is None         # learns every key from "m" on: none
    backend.put_record(8, b"eight", ())
    sql(pg_server, "SELECT pg_terminate_backend(%s)", (backend._conn.info.backend_pid,))
    assert tuple(backend.get_item("held")) == (7, b"seven")
    assert tuple(backend.get_item("m")) == (8, b"eight")
    assert backend.get_key("zebra") is None and backend.get_item("n") is None
    assert backend.existing([7, 8]) == {7, 8}
    with pytest.raises(ConnectionLostError):
        backend.get_key("a")        # before "m": not known
    assert not backend._in_transaction
    assert backend.get_key("m") is None and backend.get_key("held") == 7    # rolled back


def test_released_ids_are_unreferenced_once_their_referrers_are_deleted(url, opened):
    """is_referenced answers the released ids from one query, and deletions after it count:
    a chain of records released together is deleted link by link, as the Store does."""
    backend = opened(url)
    many = list(range(100, 101 + REFERRERS))     # more referrers than remembered

    def setup():
        backend.bind_key("x", 1)
        backend.put_record(1, b"x", [2])            # 1 -> 2 -> 3
        backend.put_record(2, b"y", [3])
        backend.put_record(3, b"z", [])
        backend.bind_key("w", 4)
        backend.put_record(4, b"w", [])
        for oid in many:
            backend.put_record(oid, b"r", [4])
            backend.bind_key(f"r{oid}", oid)
    write(backend, setup)
    backend.begin()
    assert backend.bind_key("x", 9) == 1
    assert backend.bind_key("w", 9) == 4
    for oid in many:
        assert backend.unbind_key(f"r{oid}") == oid
    assert not backend.is_referenced(1)
    backend.delete_record(1)
    assert not backend.is_referenced(2)           # its one referrer is deleted now
    backend.delete_record(2)
    assert not backend.is_referenced(3)
    backend.delete_record(3)
    assert backend.is_referenced(4)               # many referrers, none deleted yet
    for oid in many:
        assert not backend.is_referenced(oid)
        backend.delete_record(oid)
    assert not backend.is_referenced(4)           # asked again after the deletions
    backend.commit()
    assert backend.existing([1, 2, 3, 4, *many]) == {4}
