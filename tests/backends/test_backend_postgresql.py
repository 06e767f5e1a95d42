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
from pstore.backends.postgresql import BLOB_CHUNK, parse_location

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
