"""The DBM backend: a store in a database of one of the standard library's ``dbm`` modules.

The DBM modules give neither transactions nor, for ``dbm.dumb``, crash safety,
nor any locking that works across all of them. This backend adds all three:

* **Transactions**: changes are buffered in memory, written at commit as one
  redo journal (:mod:`.journal`), and only then applied to the database; a
  complete journal left by a killed process is replayed, an incomplete one
  discarded.
* **Locks**: ``<path>.lock`` serializes writers (held from :meth:`begin` to the
  end of :meth:`commit`); ``<path>.commits`` is held shared by readers for each
  read and exclusively by a writer only while it applies a journal, so readers
  wait for that apply phase and nothing else, and never see half of it;
  ``<path>.gate`` keeps a stream of readers from starving an applying writer.
* **Change detection**: ``<path>.commits`` also holds a counter that every
  apply increments; it is the change marker, and it tells readers when their
  open database handle is stale.

The key-space layout and the journal format are in ``docs/format.md``; when to
use this backend, in ``docs/backends.md``. Files written by the standard
library's ``shelve`` are read by :mod:`.shelf`.
"""

from __future__ import annotations

import dbm
import importlib
import os
import shutil
import sqlite3
import struct
import threading
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import ClosedError, CorruptionError, FormatError, LockTimeoutError, ReadOnlyError
from . import journal
from .base import Backend, binding_seal
from .blobs import BlobStore, LocalBlobs
from .files import FileLock, fsync_directory, require_existing

__all__ = ["FORMAT_KEY", "FORMAT_NAME", "FORMAT_VERSION", "MODULES", "DBMBackend",
           "choose_module"]

#: The dbm modules this backend can use, best first: plain ``backend="dbm"`` takes the
#: first one this Python has (the order of the standard library's own ``dbm.open``).
MODULES = ("dbm.sqlite3", "dbm.gnu", "dbm.ndbm", "dbm.dumb")
#: The key that marks a pstore DBM store, and what it holds.
FORMAT_KEY = b"m:format"
FORMAT_NAME = b"pstore-dbm"
#: The newest format version this code reads and the one it writes. Version 1 databases
#: become version 2 when opened for writing: version 2 added lazy refs (``l:<oid>``),
#: records of Persistent objects and blobs (``b:<oid>``), which version 1 code would misread.
#: Version 3 added record digests and the seal of each key binding; ``m:digests_from``
#: is the first object id whose record has a digest (an upgraded store's older ones may not).
FORMAT_VERSION = 3

# Meta keys (docs/format.md).
_FORMAT = FORMAT_KEY
_VERSION = b"m:version"
_NEXT_OID = b"m:next_oid"
_KEY_COUNT = b"m:keys"
_PAGE_COUNT = b"m:pages"
_OPEN_PAGE = b"m:open_page"
_FREE_PAGES = b"m:free_pages"
_DIGESTS_FROM = b"m:digests_from"

#: At most this many keys per key page: binding a new key rewrites one page.
_PAGE_KEYS = 256
_LENGTH = struct.Struct(">I")

# Database handles inherited from a parent process. Kept referenced forever, as in
# the SQLite backend: closing them in the child could act on the parent's.
_INHERITED: list[Any] = []


def _record_key(oid: int) -> bytes:
    return b"r:%d" % oid


def _refs_key(oid: int) -> bytes:
    return b"f:%d" % oid


def _blobs_key(oid: int) -> bytes:
    return b"b:%d" % oid


def _lazy_key(oid: int) -> bytes:
    return b"l:%d" % oid


def _count_key(oid: int) -> bytes:
    return b"c:%d" % oid


def _key_key(key: str) -> bytes:
    return b"k:" + _encode_key(key)


def _page_key(number: int) -> bytes:
    return b"p:%d" % number


def _encode_key(key: str) -> bytes:
    # surrogatepass: any str is a valid key, as it is for the SQLite backend.
    return key.encode("utf-8", "surrogatepass")


def _pack_ints(values: Collection[int]) -> bytes:
    return struct.pack(f"<{len(values)}q", *values)


def _unpack_ints(data: bytes | None) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 8}q", data)) if data else []


def _pack_names(names: Collection[str]) -> bytes | None:
    return ",".join(sorted(set(names))).encode("ascii") or None


def _unpack_names(data: bytes | None) -> list[str]:
    return data.decode("ascii").split(",") if data else []


def _pack_page(keys: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(key)) + key for key in keys)


def _unpack_page(data: bytes | None) -> list[bytes]:
    keys = []
    position = 0
    while data and position < len(data):
        (length,) = _LENGTH.unpack_from(data, position)
        position += _LENGTH.size
        keys.append(data[position:position + length])
        position += length
    return keys


#: The file names each module gives a database at ``path``: path + suffix.
_SUFFIXES = {
    "dbm.sqlite3": ["", "-wal", "-shm", "-journal"],
    "dbm.gnu": [""],
    "dbm.ndbm": [".db", ".pag", ".dir"],
    # .dir.saved and the .tmp files: see _DumbModule.
    "dbm.dumb": [".dat", ".dir", ".bak", ".dir.saved", ".dir.tmp", ".dir.saved.tmp"],
}


class _Module:
    """One dbm module, and what differs between them: flags, file names, crash protection.

    How handles are kept differs too. By default (dbm.gnu, dbm.ndbm, whose handles
    cache file structure) a read-only handle is reopened after every commit, and
    each apply opens and closes a handle of its own.
    """

    #: Whether one handle, opened for writing in a writable backend, may serve reads and
    #: applies, staying valid across this process's own commits.
    keeps_handle = False
    #: Whether a handle sees other processes' commits without being reopened.
    sees_other_commits = False
    #: Whether a handle may be used only by the thread that opened it.
    thread_bound = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.module = importlib.import_module(name)

    def open(self, path: str, flag: str) -> Any:
        # dbm.gnu locks the file itself and would refuse a second opener: 'u' turns that
        # off, pstore's own locks take its place.
        return self.module.open(path, flag + ("u" if self.name == "dbm.gnu" else ""), 0o600)

    def files(self, path: str) -> list[str]:
        """Every file the database at ``path`` may consist of."""
        return [path + suffix for suffix in _SUFFIXES[self.name]]

    def before_apply(self, path: str, *, again: bool, fsync: bool) -> bool:
        """Called before a journal is applied (``again``: one found on disk, whose apply
        may have been interrupted); True if it changed files that open handles cache."""
        return False

    def write(self, db: Any, changes: journal.Changes) -> None:
        """Apply ``changes`` to the handle ``db``."""
        for key, value in changes.items():
            if value is not None:
                db[key] = value
            else:
                self.delete(db, key)

    def delete(self, db: Any, key: bytes) -> None:
        """Remove ``key`` from ``db``, if there."""
        try:
            del db[key]
        except KeyError:
            pass

    def close(self, db: Any, path: str, *, writable: bool) -> None:
        """Close the handle ``db`` on ``path`` (opened for writing if ``writable``)."""
        db.close()

    def abandon(self, db: Any) -> None:
        """Close ``db`` without writing anything it buffers."""
        db.close()

    def sync(self, db: Any) -> None:
        """Write what ``db`` buffers to the files."""
        if hasattr(db, "sync"):
            db.sync()

    def after_apply(self, path: str, *, fsync: bool) -> None:
        """Called once a journal is applied and synced, before the journal is deleted."""


class _SQLiteModule(_Module):
    """dbm.sqlite3: each put is an SQLite transaction; connections always see the latest."""

    keeps_handle = True
    sees_other_commits = True
    thread_bound = True     # sqlite3's check_same_thread, which dbm.sqlite3 leaves on

    def write(self, db: Any, changes: journal.Changes) -> None:
        # dbm.sqlite3 makes each put a transaction of its own, synced to disk: a
        # thousand puts take seconds. One explicit transaction on its connection (not
        # public; without it, each put stays on its own) takes milliseconds.
        connection = getattr(db, "_cx", None)
        if connection is None:
            super().write(db, changes)
            return
        connection.execute("BEGIN")    # autocommit=True: commit() would do nothing
        try:
            super().write(db, changes)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def close(self, db: Any, path: str, *, writable: bool) -> None:
        try:
            db.close()
        except sqlite3.ProgrammingError:
            # Opened by another thread of the Store: only that thread may close it. It
            # is closed when garbage-collected, which follows at once (no cycle).
            return
        if not writable:
            return
        # As the SQLite backend does: whoever closes last puts the file back in
        # rollback-journal mode, so that a later read-only open creates no -wal/-shm
        # files. Fails harmlessly (and at once) while others have it open.
        try:
            connection = sqlite3.connect(path, timeout=0)
        except sqlite3.Error:
            return
        try:
            connection.execute("PRAGMA journal_mode = DELETE")
        except sqlite3.Error:
            pass
        finally:
            connection.close()


class _DumbModule(_Module):
    """dbm.dumb, which rewrites its index file in place on sync and on every delete.

    A process killed during that rewrite leaves the index truncated, losing keys
    the journal does not mention. So a copy of the index is taken before a journal
    is applied, and put back before the journal is applied again after a crash.
    The data file needs no copy: dumb changes only the values of keys it is given,
    which the journal rewrites anyway, and appends everything else.

    Opening reads and parses the whole index, so one handle is kept and reopened
    only after another process's commit.
    """

    keeps_handle = True

    def delete(self, db: Any, key: bytes) -> None:
        # dumb rewrites its whole index on every delete; an empty value (no value of
        # the layout is empty) is one append instead. Its space is lost either way.
        if key in db:
            db[key] = b""

    def before_apply(self, path: str, *, again: bool, fsync: bool) -> bool:
        index, saved = path + ".dir", path + ".dir.saved"
        if again and os.path.exists(saved):     # an apply of this journal was interrupted
            _copy_private(saved, index, fsync=fsync)
            return True
        _copy_private(index, saved, fsync=fsync)
        return False

    def sync(self, db: Any) -> None:
        db.sync()
        # Before Python 3.13, sync() leaves the handle marked modified, and closing it
        # (or its garbage collection) would write its index again, over the index of
        # any commit made since by another process. 3.13 resets the flag itself.
        db._modified = False

    def abandon(self, db: Any) -> None:
        db._modified = False    # else close() writes its in-memory index
        db.close()

    def after_apply(self, path: str, *, fsync: bool) -> None:
        os.unlink(path + ".dir.saved")
        if fsync:   # gone before the journal is, or a later recovery would restore it
            fsync_directory(path)


def _copy_private(source: str, target: str, *, fsync: bool) -> None:
    """Replace ``target`` atomically by a copy of ``source``, mode 0600."""
    with open(source, "rb") as file:
        content = file.read()
    temporary = target + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as file:
        file.write(content)
        if fsync:
            file.flush()
            os.fsync(file.fileno())
    os.replace(temporary, target)


def _whichdb(path: str) -> str | None:
    """``dbm.whichdb(path)``, also right while a dbm.dumb apply is to be finished.

    A kill during dbm.dumb's index rewrite can leave no index file at all, which
    ``dbm.whichdb`` then takes for no database; the saved index tells otherwise.
    """
    found = dbm.whichdb(path)
    if found is None and os.path.exists(path + ".dir.saved"):
        return "dbm.dumb"
    return found


def _load_module(name: str, path: str) -> _Module:
    try:
        return {"dbm.dumb": _DumbModule, "dbm.sqlite3": _SQLiteModule}.get(name, _Module)(name)
    except ImportError:
        raise FormatError(path, f"it needs the module {name}, which this Python lacks") from None


def choose_module(path: str, flag: str, variant: str | None) -> _Module:
    """The module for ``path``: the one named, else the one that wrote it, else the best.

    Also used by :mod:`.shelf`. Raises ``ValueError`` for an unknown name and
    :class:`~pstore.errors.FormatError` for a file of another or no dbm module.
    """
    if variant is not None and variant not in MODULES:
        raise ValueError(f"unknown dbm module {variant!r}; known: {', '.join(MODULES)}")
    found = None if flag == "n" else _whichdb(path)
    if found == "":
        raise FormatError(path, "not a database of any dbm module")
    if found is not None and variant is not None and found != variant:
        raise FormatError(path, f"a {found} database, not a {variant} one")
    name = variant or found
    if name is not None:
        return _load_module(name, path)
    for name in MODULES:
        try:
            return _load_module(name, path)
        except FormatError:
            continue
    raise AssertionError("dbm.dumb is always importable")


class DBMBackend(LocalBlobs, Backend):
    """A store in a database of a ``dbm`` module, with the SQLite backend's guarantees.

    ``variant`` names the module (``backend="dbm:dbm.dumb"``); without it, an
    existing database is opened with the module that wrote it and a new one is
    created with the first of :data:`MODULES` this Python has.

    What a user may rely on: every transaction is all or nothing, even if the
    process is killed at any instant; a commit that returned survives the
    process being killed (with ``fsync=True``, also power loss, as far as the
    dbm module's own writes are durable once synced); readers never see part of a
    transaction and wait only while a writer applies one; the store is usable
    from many processes at once.
    """

    def __init__(self, path: str, flag: str, *, lock_timeout: float, fsync: bool,
                 variant: str | None = None) -> None:
        self.path = path
        self.read_only = flag == "r"
        self._lock_timeout = lock_timeout
        self._fsync = fsync
        self._journal_path = path + ".journal"
        self._module = choose_module(path, flag, variant)
        self._db: Any = None                 # the handle reads go through
        self._db_version: int | None = None  # the commit counter it is current with
        self._db_thread = 0                  # the thread that opened it
        self._tx: dict[bytes, bytes | None] | None = None   # the open transaction's changes
        self._tx_pages: dict[int, list[bytes]] = {}          # and its key pages, decoded
        self._own_commits = 0   # how many of the commit counter's steps are this object's
        self._closed = False
        self._sealed = True     # whether key bindings carry seals (format version 3)
        self._blobs = BlobStore(path + ".blobs")
        self._make_locks()
        if flag == "n":
            shutil.rmtree(self._blobs.directory, ignore_errors=True)
            # Every module's files: a leftover of another module would make dbm.whichdb
            # take the new database for one of that module.
            for name in [*(path + suffix for suffixes in _SUFFIXES.values()
                           for suffix in suffixes), self._journal_path]:
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
        require_existing(path, flag, lambda: _whichdb(path) is not None)
        try:
            if flag in ("c", "n"):
                self._create_database()
            self._check_format(create=flag in ("c", "n"))
        except BaseException:
            self.close()
            raise

    # -- opening ----------------------------------------------------------------------------

    def _make_locks(self) -> None:
        self._write_lock = FileLock(self.path + ".lock", self._lock_timeout)
        # Held for microseconds (a read) or milliseconds (an apply), very often: a
        # waiter must retry often to catch the moments it is free.
        self._apply_lock = FileLock(self.path + ".commits", self._lock_timeout,
                                    longest_pause=0.0002)
        # Readers pass it (shared) on their way to the apply lock; an applying writer
        # holds it (exclusive) so that no new reader slips in while it waits for the
        # readers already in. Without it, readers back to back starve the writer.
        self._gate = FileLock(self.path + ".gate", self._lock_timeout, longest_pause=0.0002)

    def _share(self) -> None:
        """Take the apply lock shared, through the gate."""
        self._lock(self._gate, shared=True)
        try:
            self._lock(self._apply_lock, shared=True)
        finally:
            self._gate.release()

    def _exclude(self) -> None:
        """Take the gate and the apply lock exclusively (release with _unexclude)."""
        self._lock(self._gate)
        try:
            self._lock(self._apply_lock)
        except BaseException:
            self._gate.release()
            raise

    def _unexclude(self) -> None:
        self._apply_lock.release()
        self._gate.release()

    def _create_database(self) -> None:
        """Create an empty database if there is none, under the write lock."""
        if _whichdb(self.path) is not None:
            return
        self._lock(self._write_lock)
        try:
            if _whichdb(self.path) is None:  # another process may have created it
                self._module.close(self._module.open(self.path, "c"), self.path, writable=True)
                for name in self._module.files(self.path):
                    if os.path.exists(name):
                        os.chmod(name, 0o600)
        finally:
            self._write_lock.release()

    def _check_format(self, create: bool) -> None:
        # With a handle of its own, opened read-only: opening a database for writing
        # may change it already (dbm.sqlite3 switches it to WAL mode), and a foreign
        # database must be left untouched.
        try:
            self._share()
            try:
                self._recover_if_orphaned()
                db = self._module.open(self.path, "r")
                try:
                    fmt, version = db.get(_FORMAT), db.get(_VERSION)
                    digests_from = db.get(_DIGESTS_FROM)
                    empty = fmt is None and len(db) == 0
                finally:
                    self._module.close(db, self.path, writable=False)
            finally:
                self._apply_lock.release()
        except LockTimeoutError:
            raise
        except (OSError, ValueError, SyntaxError) as error:   # what the modules raise on junk
            raise FormatError(self.path, f"not a readable {self._module.name} database "
                                         f"({error})") from None
        if empty and create:
            self._initialize()
        elif empty:
            raise FormatError(self.path, "an empty database")
        elif fmt != FORMAT_NAME or version is None or not version.isdigit():
            raise FormatError(self.path, f"a {self._module.name} database without pstore's "
                                         f"meta keys (for a shelve file: backend='shelve')")
        elif int(version) > FORMAT_VERSION:
            raise FormatError(self.path, f"format version {int(version)} was written by a "
                                         f"newer pstore; this one reads up to {FORMAT_VERSION}")
        elif int(version) < FORMAT_VERSION and not self.read_only:
            self._upgrade()
        else:
            self._sealed = int(version) >= 3
            if not self._sealed:
                self.digests_from = 1 << 63     # any record may predate digests
            elif digests_from is not None and digests_from.isdigit():
                self.digests_from = int(digests_from)

    def _upgrade(self) -> None:
        """Bring an older database to the current version: a version 1 one has no lazy
        refs and no blobs, which is what missing ``l:`` and ``b:`` keys mean; before
        version 3 key bindings have no seal (added here) and records no digest (those
        written from now on have one)."""
        self.begin()
        try:
            if self._get_int(_VERSION) < 3:
                for keys in self._pages():
                    for key in keys:
                        oid, page = (int(part) for part in self._get(b"k:" + key).split()[:2])
                        self._put(b"k:" + key, self._binding_value(
                            key.decode("utf-8", "surrogatepass"), oid, page))
                self._put(_DIGESTS_FROM, b"%d" % self._get_int(_NEXT_OID, 1))
            self._put(_VERSION, b"%d" % FORMAT_VERSION)
            self.digests_from = self._get_int(_DIGESTS_FROM, 1)
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def _initialize(self) -> None:
        self.begin()
        try:
            # Another process may have initialized it while this one waited for the lock.
            if self._get(_FORMAT) is None:
                self._put(_FORMAT, FORMAT_NAME)
                self._put(_VERSION, b"%d" % FORMAT_VERSION)
                self._put(_DIGESTS_FROM, b"1")
            self.commit()
        except BaseException:
            self.rollback()
            raise

    # -- reading and writing the database ---------------------------------------------------

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Make the database safe to read for the block: no apply runs meanwhile.

        Inside a transaction the write lock already keeps the database still.
        """
        if self._closed:
            raise ClosedError(self.path)
        if self._tx is not None:
            yield
            return
        self._share()
        try:
            self._recover_if_orphaned()
            self._refresh()
            yield
        finally:
            self._apply_lock.release()

    def _recover_if_orphaned(self) -> None:
        """Recover a journal whose writer died; the caller holds the shared lock."""
        if os.path.exists(self._journal_path) and self._write_lock.acquire(wait=False):
            # A journal and no writer alive: its writer died, maybe halfway through
            # applying it. Recover before reading (even a read-only store does, as
            # SQLite does with a hot journal): only that makes the database whole.
            self._apply_lock.release()
            try:
                self._recover()
            finally:
                self._write_lock.release()
                self._share()
        # With a journal and a writer alive, the writer has not begun applying it (that
        # needs the lock the caller holds): the database is the last committed state.

    def _refresh(self) -> None:
        """Reopen the handle if it may be stale: a commit happened since it was current.

        DBM modules cache (dbm.dumb its whole index) and do not notice other
        processes' writes.
        """
        version = self._commit_counter()
        if self._handle_is_current(version):
            return
        self._drop_handle()
        writable = self._module.keeps_handle and not self.read_only
        self._db = self._module.open(self.path, "w" if writable else "r")
        self._db_version = version
        self._db_thread = threading.get_ident()

    def _handle_is_current(self, version: int) -> bool:
        """Whether the handle may be used now, the commit counter being ``version``."""
        return (self._db is not None
                and (version == self._db_version or self._module.sees_other_commits)
                and not (self._module.thread_bound and self._db_thread != threading.get_ident()))

    def _drop_handle(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            self._module.close(db, self.path,
                               writable=self._module.keeps_handle and not self.read_only)

    def _commit_counter(self) -> int:
        return int.from_bytes(os.pread(self._apply_lock.fileno(), 8, 0), "big")

    def _get(self, key: bytes) -> bytes | None:
        """The value of ``key`` as the open transaction sees it; call inside _reading()."""
        if self._tx is not None and key in self._tx:
            return self._tx[key]
        return self._db.get(key) or None    # b"": deleted (see _DumbModule.delete)

    def _put(self, key: bytes, value: bytes | None) -> None:
        """Set (None: delete) ``key`` in the open transaction."""
        if self._tx is None:
            raise RuntimeError("pstore backend: a write outside a transaction")
        self._tx[key] = value

    def _get_int(self, key: bytes, default: int = 0) -> int:
        value = self._get(key)
        return default if value is None else int(value)

    def _put_int(self, key: bytes, value: int) -> None:
        self._put(key, b"%d" % value)

    def _lock(self, lock: FileLock, shared: bool = False) -> None:
        if not lock.acquire(shared=shared):
            raise LockTimeoutError(self.path, self._lock_timeout)

    # -- records ----------------------------------------------------------------------------

    def new_oid(self) -> int:
        # The counter never goes back, so ids freed by gc are never reused: another
        # process may still hold an object under such an id.
        oid = self._get_int(_NEXT_OID, 1)
        self._put_int(_NEXT_OID, oid + 1)
        return oid

    def get_record(self, oid: int) -> bytes | None:
        with self._reading():
            return self._get(_record_key(oid))

    def put_record(self, oid: int, data: bytes, refs: Collection[int],
                   *, lazy_refs: Collection[int] = (), blobs: Collection[str] = ()) -> None:
        old = set(_unpack_ints(self._get(_refs_key(oid))))
        new = set(refs)
        for ref in old - new:
            self._add_referrers(ref, -1)
        for ref in new - old:
            self._add_referrers(ref, 1)
        self._put(_record_key(oid), data)
        self._put(_refs_key(oid), _pack_ints(sorted(new)) if new else None)
        if lazy_refs or self._get(_lazy_key(oid)) is not None:
            self._put(_lazy_key(oid), _pack_ints(sorted(lazy_refs)) if lazy_refs else None)
        if blobs or self._get(_blobs_key(oid)) is not None:
            self._put(_blobs_key(oid), _pack_names(blobs))

    def delete_record(self, oid: int) -> None:
        for ref in _unpack_ints(self._get(_refs_key(oid))):
            self._add_referrers(ref, -1)
        self._put(_record_key(oid), None)
        self._put(_refs_key(oid), None)
        self._put(_blobs_key(oid), None)
        if self._get(_lazy_key(oid)) is not None:
            self._put(_lazy_key(oid), None)

    def _add_referrers(self, oid: int, delta: int) -> None:
        """Change the number of keys and records referring to ``oid`` by ``delta``.

        The count is what makes :meth:`is_referenced` one lookup: a DBM has no index
        from a ref back to the records holding it.
        """
        count = self._get_int(_count_key(oid)) + delta
        self._put(_count_key(oid), b"%d" % count if count else None)

    def existing(self, oids: Collection[int]) -> set[int]:
        with self._reading():
            return {oid for oid in oids if self._get(_record_key(oid)) is not None}

    def is_referenced(self, oid: int) -> bool:
        with self._reading():
            return self._get(_count_key(oid)) is not None

    def reaches(self, sources: Collection[int], target: int) -> bool:
        with self._reading():
            seen: set[int] = set()
            stack = list(sources)
            while stack:
                oid = stack.pop()
                if oid == target:
                    return True
                if oid not in seen:
                    seen.add(oid)
                    refs = _unpack_ints(self._get(_refs_key(oid)))
                    lazy = _unpack_ints(self._get(_lazy_key(oid)))
                    stack.extend(set(refs).difference(lazy) if lazy else refs)
            return False

    # -- keys -------------------------------------------------------------------------------

    @staticmethod
    def _binding_value(key: str, oid: int, page: int) -> bytes:
        return b"%d %d %s" % (oid, page, binding_seal(key, oid).hex().encode())

    def _unsealed(self, key: str, value: bytes) -> tuple[int, int]:
        """``(object id, key page)`` of binding ``value`` of ``key``, its seal checked."""
        parts = value.split()
        if len(parts) in (2, 3) and parts[0].isdigit() and parts[1].isdigit():
            oid, page = int(parts[0]), int(parts[1])
            if not self._sealed or parts[2:] == [binding_seal(key, oid).hex().encode()]:
                return oid, page
            raise CorruptionError(self.path, f"the binding of the key to object id {oid} does "
                                  f"not match its seal", key=key, object_id=oid)
        raise CorruptionError(self.path, f"the key's binding is not an object id and a page "
                              f"({value[:40]!r})", key=key)

    def _binding(self, key: str) -> tuple[int, int] | None:
        """``(object id, key page)`` of ``key``, or None."""
        value = self._get(_key_key(key))
        return None if value is None else self._unsealed(key, value)

    def _paged_oid(self, key: bytes) -> int:
        """The object id of ``key`` (encoded), which a key page lists, so is bound."""
        value = self._get(b"k:" + key)
        if value is None:
            raise CorruptionError(self.path, "a key page lists it, but it is unbound",
                                  key=key.decode("utf-8", "surrogatepass"))
        return self._unsealed(key.decode("utf-8", "surrogatepass"), value)[0]

    def get_key(self, key: str) -> int | None:
        with self._reading():
            binding = self._binding(key)
        return None if binding is None else binding[0]

    def get_item(self, key: str) -> tuple[int, bytes | None] | None:
        with self._reading():
            binding = self._binding(key)
            return None if binding is None else (binding[0], self._get(_record_key(binding[0])))

    def bind_key(self, key: str, oid: int) -> int | None:
        binding = self._binding(key)
        if binding is None:
            page = self._add_to_page(_encode_key(key))
            self._put_int(_KEY_COUNT, self._get_int(_KEY_COUNT) + 1)
        else:
            previous, page = binding
            if previous == oid:
                return previous
            self._add_referrers(previous, -1)
        self._add_referrers(oid, 1)
        self._put(_key_key(key), self._binding_value(key, oid, page))
        return None if binding is None else binding[0]

    def unbind_key(self, key: str) -> int | None:
        binding = self._binding(key)
        if binding is None:
            return None
        oid, page = binding
        self._remove_from_page(page, _encode_key(key))
        self._put_int(_KEY_COUNT, self._get_int(_KEY_COUNT) - 1)
        self._add_referrers(oid, -1)
        self._put(_key_key(key), None)
        return oid

    # Key pages list the bound keys for iteration, a page at a time; see docs/format.md.
    # A key stays in its page while it is bound, so an iteration that reads the pages
    # one by one sees every key that stays bound exactly once.

    def _page(self, number: int) -> list[bytes]:
        """The keys of page ``number``; in a transaction, the list its changes go to.

        A transaction keeps the pages it touches decoded, and encodes them once, at
        commit (see _flush_pages): binding many keys costs no page encoding each.
        """
        if self._tx is None:
            return _unpack_page(self._get(_page_key(number)))
        keys = self._tx_pages.get(number)
        if keys is None:
            keys = self._tx_pages[number] = _unpack_page(self._get(_page_key(number)))
        return keys

    def _flush_pages(self) -> None:
        for number, keys in self._tx_pages.items():
            self._put(_page_key(number), _pack_page(keys) if keys else None)
        self._tx_pages.clear()

    def _add_to_page(self, key: bytes) -> int:
        number = self._get_int(_OPEN_PAGE, -1)
        keys = self._page(number) if number >= 0 else []
        if number < 0 or len(keys) >= _PAGE_KEYS:
            free = _unpack_ints(self._get(_FREE_PAGES))
            if free:
                number = free.pop()
                self._put(_FREE_PAGES, _pack_ints(free) if free else None)
            else:
                number = self._get_int(_PAGE_COUNT)
                self._put_int(_PAGE_COUNT, number + 1)
            self._put_int(_OPEN_PAGE, number)
            keys = self._page(number)
        keys.append(key)
        return number

    def _remove_from_page(self, number: int, key: bytes) -> None:
        keys = self._page(number)
        keys.remove(key)
        # A page that falls below half full is filled again later, so that pages
        # stay dense however keys come and go; it crosses half only once before then.
        if len(keys) == _PAGE_KEYS // 2 - 1 and number != self._get_int(_OPEN_PAGE, -1):
            free = _unpack_ints(self._get(_FREE_PAGES))
            self._put(_FREE_PAGES, _pack_ints([*free, number]))

    def _pages(self) -> Iterator[list[bytes]]:
        """The key pages, each read in one locked step; no lock is held between pages."""
        with self._reading():
            count = self._get_int(_PAGE_COUNT)
        for number in range(count):
            with self._reading():
                keys = list(self._page(number))     # a copy: the caller may change pages
            if keys:
                yield keys

    def iter_keys(self) -> Iterator[str]:
        """Every bound key, a page of keys at a time, in no particular order.

        Outside a transaction, each page is read while no commit is being applied,
        and no lock is held between pages: a key bound for the whole iteration is
        seen exactly once; one bound or unbound meanwhile may or may not be seen
        (and one unbound and bound again may be seen twice).
        """
        for keys in self._pages():
            for key in keys:
                yield key.decode("utf-8", "surrogatepass")

    def iter_items(self) -> Iterator[tuple[str, int, bytes | None]]:
        with self._reading():
            count = self._get_int(_PAGE_COUNT)
        for number in range(count):
            with self._reading():
                items = []
                for key in self._page(number):
                    oid = self._paged_oid(key)
                    items.append((key.decode("utf-8", "surrogatepass"), oid,
                                  self._get(_record_key(oid))))
            yield from items

    def count_keys(self) -> int:
        with self._reading():
            return self._get_int(_KEY_COUNT)

    # -- transactions -----------------------------------------------------------------------

    def begin(self) -> None:
        if self.read_only:
            raise ReadOnlyError(self.path, "write")
        if self._closed:
            raise ClosedError(self.path)
        self._lock(self._write_lock)
        try:
            if os.path.exists(self._journal_path):  # left by a writer that died
                self._recover()
            self._refresh()
        except BaseException:
            self._write_lock.release()
            raise
        self._tx = {}

    def commit(self) -> None:
        if self._tx is not None:
            self._flush_pages()
        changes, self._tx = self._tx, None
        committed = not changes     # nothing to write: committed as it is
        try:
            if changes:
                # The commit point: once the journal is complete, the transaction is
                # applied, by this process now or by the next one to find it.
                journal.write(self._journal_path, changes, fsync=self._fsync)
                committed = True
                self._apply(changes, again=False)
                self._own_commits += 1
        finally:
            if changes is not None:
                self._end(committed)

    def rollback(self) -> None:
        self._tx_pages.clear()
        if self._tx is not None:
            self._tx = None
            self._end(committed=False)

    def _end(self, committed: bool) -> None:
        try:
            self._blobs.end(committed)      # still under the lock: see BlobStore.end
        finally:
            self._write_lock.release()

    def _recover(self) -> None:
        """Finish a dead writer's journal: apply it if complete, else discard it.

        The caller holds the write lock.
        """
        changes = journal.read(self._journal_path)
        if changes is None:     # its writer died before the commit point
            journal.remove(self._journal_path, fsync=self._fsync)
        else:
            self._apply(changes, again=True)

    def _apply(self, changes: journal.Changes, *, again: bool) -> None:
        """Apply the journal's ``changes`` to the database, then delete the journal.

        ``again``: the journal was found on disk, left by a writer that died. The
        caller holds the write lock. Readers are kept out (exclusive lock on
        ``.commits``) from before the first change until the journal is gone.
        Every step may be repeated after a crash: puts and deletes are idempotent.
        """
        self._exclude()
        try:
            version = self._commit_counter()
            # Counted first, so that every reader reopens its handle after this apply,
            # even one interrupted and finished by another process.
            os.pwrite(self._apply_lock.fileno(), (version + 1).to_bytes(8, "big"), 0)
            if self._module.before_apply(self.path, again=again, fsync=self._fsync):
                self._drop_handle()
            own = (self._module.keeps_handle and not self.read_only
                   and self._handle_is_current(version))
            db = self._db if own else self._module.open(self.path, "w")
            try:
                self._module.write(db, changes)
                self._module.sync(db)
            except BaseException:
                if own:     # half written: never to be written again (recovery will)
                    self._db = None
                    self._module.abandon(db)
                raise
            finally:
                if not own:
                    self._module.close(db, self.path, writable=True)
            if own:
                self._db_version = version + 1
            if self._fsync:
                for name in self._module.files(self.path):
                    if os.path.exists(name):
                        _fsync_file(name)
                fsync_directory(self.path)
            self._module.after_apply(self.path, fsync=self._fsync)
            journal.remove(self._journal_path, fsync=self._fsync)
        finally:
            self._unexclude()

    def change_marker(self) -> int:
        """The number of commits applied by other connections (and recoveries) so far."""
        if self._closed:
            raise ClosedError(self.path)
        self._share()
        try:
            return self._commit_counter() - self._own_commits
        finally:
            self._apply_lock.release()

    # -- maintenance ------------------------------------------------------------------------

    def iter_records(self) -> Iterator[tuple[int, bytes, list[int]]]:
        # Ids are allocated in order, so every record has one below next_oid.
        with self._reading():
            end = self._get_int(_NEXT_OID, 1)
        for oid in range(1, end):
            with self._reading():
                data = self._get(_record_key(oid))
                refs = _unpack_ints(self._get(_refs_key(oid))) if data is not None else []
            if data is not None:
                yield oid, data, refs

    def gc(self) -> int:
        # Mark: every object id reachable from a key. Memory grows with the live ids
        # (and the deletions the transaction buffers), never with the records' data.
        live: set[int] = set()
        stack: list[int] = []
        for keys in self._pages():
            stack.extend(self._paged_oid(key) for key in keys)
        while stack:
            oid = stack.pop()
            if oid not in live:
                live.add(oid)
                stack.extend(_unpack_ints(self._get(_refs_key(oid))))
        # Sweep: ids are allocated in order, so every record has one below next_oid.
        deleted = 0
        for oid in range(1, self._get_int(_NEXT_OID, 1)):
            if oid not in live and self._get(_record_key(oid)) is not None:
                self.delete_record(oid)
                deleted += 1
        self._blobs.collect({name for oid in live
                             for name in _unpack_names(self._get(_blobs_key(oid)))})
        return deleted

    def after_fork(self) -> None:
        if self._closed:
            return
        if self._db is not None:
            _INHERITED.append(self._db)
        self._write_lock.abandon()
        self._apply_lock.abandon()
        self._gate.abandon()
        self._make_locks()
        self._db = None
        self._tx = None
        self._tx_pages.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.rollback()
        finally:
            self._tx = None
            self._drop_handle()
            self._write_lock.close()
            self._apply_lock.close()
            self._gate.close()


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

