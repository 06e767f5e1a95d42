"""A throwaway PostgreSQL cluster for the test session (a pytest plugin: tests/conftest.py).

``pg_server`` starts one cluster per session, the first time a test asks for it:
``initdb`` into a temporary folder, ``pg_ctl start`` listening on a Unix socket in
that folder only (``listen_addresses=''``: nothing on the network), small
``shared_buffers`` (the machine is shared), stopped and deleted at the end of the
session. As root (CI), the server runs as the ``postgres`` user through
``runuser``, since ``initdb`` refuses root. Without the server binaries (or
psycopg) every PostgreSQL test is skipped, saying why.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

__all__ = ["ClusterUnavailable", "PostgresServer", "pg_server", "skip_local_file_tests",
           "throwaway_cluster"]

#: The superuser initdb creates; the tests connect as it (trust authentication, socket only).
SUPERUSER = "postgres"
_PORT = 5432
_store_numbers = itertools.count(1)


def _bindir() -> str | None:
    """The folder of initdb and pg_ctl: pg_config's answer, else PATH's."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                check=False)
        folder = result.stdout.strip()
        if result.returncode == 0 and os.path.exists(os.path.join(folder, "initdb")):
            return folder
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class PostgresServer:
    """A running cluster: ``location()`` names a fresh store on it."""

    port = _PORT

    def __init__(self, bindir: str, directory: str, run_as: list[str]) -> None:
        self.bindir = bindir
        self.directory = directory      # holds data/, the socket and the log
        self.data = os.path.join(directory, "data")
        self.log = os.path.join(directory, "server.log")
        self._run_as = run_as

    def run(self, program: str, *args: str) -> None:
        """Run one of the server's programs as the server's user; raise with its output."""
        command = [*self._run_as, os.path.join(self.bindir, program), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                check=False)
        if result.returncode:
            log = ""
            if os.path.exists(self.log):
                with open(self.log) as file:
                    log = file.read()[-2000:]
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}\n{log}")

    def initdb(self) -> None:
        self.run("initdb", "-D", self.data, "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                 "--locale=C", "--no-sync")

    def start(self) -> None:
        # fsync off: a throwaway cluster, never crashed (restarts stop it cleanly first).
        options = (f"-c listen_addresses='' -k {self.directory} -p {_PORT} "
                   "-c shared_buffers=16MB -c max_connections=60 -c fsync=off "
                   "-c full_page_writes=off -c max_wal_size=256MB")
        self.run("pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Stop the server (disconnecting every client) and start it again."""
        self.stop()
        self.start()

    def conninfo(self) -> str:
        """A libpq URI of the server's database ``postgres``, without a store."""
        return f"postgresql://{SUPERUSER}@/postgres?host={self.directory}&port={_PORT}"

    def query(self, statement: str, params: Any = ()) -> Any:
        """The first column of the first row of ``statement`` (None without rows), run on a
        connection of its own as the superuser."""
        import psycopg
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            cursor = conn.execute(statement, params)
            row = cursor.fetchone() if cursor.description else None
            return None if row is None else row[0]

    def location(self, store: str | None = None) -> str:
        """The URL of a store on this server: ``store``, or a name no other test used."""
        if store is None:
            store = f"test_{os.getpid()}_{next(_store_numbers)}"
        return f"{self.conninfo()}&store={store}"


class ClusterUnavailable(Exception):
    """No cluster can be started here; the message says why."""


@contextmanager
def throwaway_cluster() -> Iterator[PostgresServer]:
    """A cluster in a new temporary folder, running while the context lasts, then deleted.

    Raises :class:`ClusterUnavailable` without the binaries or psycopg, or as root
    without a ``postgres`` user to run the server.
    """
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise ClusterUnavailable("psycopg is not installed (pip install pstore[postgresql])") \
            from None
    bindir = _bindir()
    if bindir is None:
        raise ClusterUnavailable("no PostgreSQL server binaries (initdb, pg_ctl) through "
                                 "pg_config or PATH")
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:      # initdb refuses root
        try:
            owner = pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise ClusterUnavailable(f"running as root and there is no {SUPERUSER!r} user to "
                                     "run the server") from None
        run_as = ["runuser", "-u", SUPERUSER, "--"]
    directory = tempfile.mkdtemp(prefix="pstore-pg-")
    try:
        if owner is not None:
            os.chown(directory, owner.pw_uid, owner.pw_gid)
        server = PostgresServer(bindir, directory, run_as)
        server.initdb()
        server.start()
        try:
            yield server
        finally:
            server.stop("immediate")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL cluster (started at first use, stopped at the end)."""
    try:
        with throwaway_cluster() as server:
            yield server
    except ClusterUnavailable as reason:     # raised only before the yield
        pytest.skip(str(reason))


def skip_local_file_tests(request: pytest.FixtureRequest, names: dict[str, str]) -> None:
    """Skip the test if it runs on PostgreSQL and is one of ``names`` (test name -> why)."""
    if "backend_name" not in request.fixturenames:
        return
    if request.getfixturevalue("backend_name") != "postgresql":
        return
    reason = names.get(request.node.originalname)
    if reason is not None:
        pytest.skip(f"not on PostgreSQL: {reason}")
