"""A database of one of the standard library's ``dbm`` modules, made transactional,
crash-safe and shared by many processes: the ground the DBM backend's layout stands on.

The DBM modules give neither transactions nor, for ``dbm.dumb``, crash safety, nor
any locking that works across all of them. :class:`JournaledDatabase` adds all three,
knowing nothing of what the keys mean:

* **Transactions**: changes are buffered in memory, written at commit as one redo
  journal (:mod:`.journal`), and only then applied to the database; a journal left by
  a killed process is applied by the next writer. A read-only database writes
  nothing: it reads such a journal as an overlay instead.
* **Locks**: ``<path>.lock`` serializes writers (held from :meth:`begin` to the end of
  :meth:`commit`); :class:`~.files.ApplyLocks` keeps readers out while a writer
  applies a journal, and nothing else.
* **Change detection**: ``<path>.commits`` holds a counter that every apply
  increments; it is the change marker, and it tells readers when their open handle
  is stale.

What the keys mean, and the checks on them, are the backend's (:mod:`.dbm`); the
adapters over the modules are :mod:`.dbm_modules`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from ..errors import ClosedError, CorruptionError, ReadOnlyError
from . import journal, size_of
from .dbm_modules import SUFFIXES, Module, remove_rewrite_leftovers, rewrite_pending, whichdb
from .files import (
    INHERITED,
    ApplyLocks,
    FileLock,
    fsync_directory,
    fsync_file,
    remove_files,
)

__all__ = ["Getter", "JournaledDatabase", "Snapshot"]

#: Reads one key: its value, or None if it has none.
Getter = Callable[[bytes], "bytes | None"]


class Snapshot(NamedTuple):
    """The database as a handle of its own sees it (see :meth:`JournaledDatabase.snapshot`)."""

    #: The value of a key, a complete journal's changes read over the database.
    get: Getter
    #: Whether the database holds no entry at all.
    empty: bool
    #: The module's tally of the database (see :meth:`~.dbm_modules.Module.tally`), or
    #: None when a journal overlays it (the tally is of the database alone).
    tally: Callable[[], bytes | None]


class JournaledDatabase:
    """The database at ``path`` of dbm module ``module``, with transactions (see the module).

    ``validate(changes, stored)`` checks a journal's ``changes`` against the database
    (``stored`` reads it) before they are applied or overlaid, raising
    :class:`~pstore.errors.CorruptionError` to refuse them; ``on_end(committed)`` runs
    at the end of every write transaction, still under the write lock.
    """

    def __init__(self, path: str, module: Module, *, read_only: bool, lock_timeout: float,
                 fsync: bool, owner: int,
                 validate: Callable[[journal.Changes, Getter], None],
                 on_end: Callable[[bool], None]) -> None:
        self.path = path
        self.module = module
        self.read_only = read_only
        self._lock_timeout = lock_timeout
        self._fsync = fsync
        self._owner = owner
        self._validate = validate
        self._on_end = on_end
        self._journal = journal.PendingJournal(path + ".journal", owner, self._validate_journal)
        self._handle: Any = None                 # the handle reads go through
        self._handle_version: int | None = None  # the commit counter it is current with
        self._handle_thread = 0                  # the thread that opened it
        #: The open transaction's changes (None: no transaction is open).
        self.changes: dict[bytes, bytes | None] | None = None
        self._own_commits = 0   # how many of the commit counter's steps are this object's
        self._held_still = False    # between begin_read and end_read
        self.closed = False
        # Read-only: the changes of a complete journal not yet applied, and what identified
        # the journal file they were read from.
        self._overlay: dict[bytes, bytes | None] = {}
        self._overlay_of: Hashable = None
        self._make_locks()

    def _make_locks(self) -> None:
        self._write_lock = FileLock(self.path + ".lock", self._lock_timeout, owner=self._owner,
                                    names_holder=not self.read_only)
        self._locks = ApplyLocks(self.path, self._lock_timeout, self._owner)

    # -- the files ---------------------------------------------------------------------------

    def remove_files(self) -> None:
        """Remove the database's files under the write lock -- every module's (a leftover
        would make dbm.whichdb misjudge a new database) -- and its journal."""
        remove_files([*(self.path + suffix for suffixes in SUFFIXES.values()
                        for suffix in suffixes), self._journal.path], self._write_lock, self.path)

    def create(self) -> None:
        """Create an empty database if there is none, under the write lock."""
        if whichdb(self.path) is not None:
            return
        self._write_lock.lock(self.path)
        try:
            if whichdb(self.path) is None:  # another process may have created it
                self.module.close(self.module.open(self.path, "c"), self.path, writable=True)
                for name in self.module.files(self.path):
                    if os.path.exists(name):
                        os.chmod(name, 0o600)
        finally:
            self._write_lock.release()

    def problems(self) -> list[str]:
        """Journals that failed their check (this session's, and every one moved aside
        earlier)."""
        return self._journal.problems()

    # -- reading -----------------------------------------------------------------------------

    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """The database through a read-only handle of its own, a dead writer's journal
        recovered first, no apply running meanwhile.

        Opening a database for writing may change it already (dbm.sqlite3 switches it
        to WAL mode): this never does, so a foreign database is left untouched.
        """
        self._locks.share()
        try:
            self._recover_if_orphaned()
            db = self.module.open(self.path, "r")
            try:
                overlay = self._overlay

                def get(key: bytes) -> bytes | None:
                    return overlay[key] if key in overlay else db.get(key) or None

                yield Snapshot(get, len(db) == 0,
                               lambda: None if overlay else self.module.tally(db))
            finally:
                self.module.close(db, self.path, writable=False)
        finally:
            self._locks.unshare()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Make the database safe to read for the block: no apply runs meanwhile.

        Inside a transaction or a snapshot the write lock already keeps the database still.
        """
        if self.closed:
            raise ClosedError(self.path)
        if self.changes is not None or self._held_still:
            yield
            return
        self._locks.share()
        try:
            self._recover_if_orphaned()
            self._refresh()
            yield
        finally:
            self._locks.unshare()

    def get(self, key: bytes) -> bytes | None:
        """The value of ``key`` as the open transaction sees it; call inside :meth:`reading`."""
        if self.changes is not None and key in self.changes:
            return self.changes[key]
        if self._overlay and key in self._overlay:
            return self._overlay[key]
        return self._handle.get(key) or None    # b"": deleted (see DumbModule.delete)

    def put(self, key: bytes, value: bytes | None) -> None:
        """Set (None: delete) ``key`` in the open transaction."""
        if self.changes is None:
            raise RuntimeError("pstore backend: a write outside a transaction")
        self.changes[key] = value

    def get_int(self, key: bytes, default: int = 0) -> int:
        value = self.get(key)
        return default if value is None else int(value)

    def put_int(self, key: bytes, value: int) -> None:
        self.put(key, b"%d" % value)

    def keys(self) -> set[bytes]:
        """Every key the database, the open transaction or the overlay names (some
        deleted: :meth:`get` says which), read at once; inside :meth:`reading`."""
        keys = set(self._handle.keys())
        keys.update(self.changes or ())
        keys.update(self._overlay)
        return keys

    def tally_after(self, changes: journal.Changes) -> bytes | None:
        """The module's tally of the database once ``changes`` are applied."""
        return self.module.tally_after(self._handle, changes)

    def _recover_if_orphaned(self) -> None:
        """Recover a journal whose writer died; the caller holds the shared lock.

        A read-only database writes nothing: it reads a complete journal as an overlay
        over the database instead (what the committed transaction says), and leaves
        applying it to the next writer.
        """
        if self.read_only:
            self._load_overlay()
        elif ((self._journal.exists() or rewrite_pending(self.path))
              and self._write_lock.acquire(wait=False)):
            # A journal and no writer alive: its writer died, maybe halfway through
            # applying it. Recover before reading: only that makes the database whole.
            self._locks.unshare()
            try:
                self._recover()
            finally:
                self._write_lock.release()
                self._locks.share()
        # With a journal and a writer alive, the writer has not begun applying it (that
        # needs the lock the caller holds): the database is the last committed state.

    def _load_overlay(self) -> None:
        self._overlay, self._overlay_of = self._journal.overlay()

    def _validate_journal(self, changes: journal.Changes) -> None:
        db = self.module.open(self.path, "r")
        try:
            self._validate(changes, lambda key: db.get(key) or None)
        finally:
            self.module.close(db, self.path, writable=False)

    def _refresh(self) -> None:
        """Reopen the handle if it may be stale: a commit happened since it was current.

        DBM modules cache (dbm.dumb its whole index) and do not notice other
        processes' writes.
        """
        version = self._locks.count()
        if self._handle_is_current(version):
            return
        self.drop_handle()
        writable = self.module.keeps_handle and not self.read_only
        self._handle = self.module.open(self.path, "w" if writable else "r")
        self._handle_version = version
        self._handle_thread = threading.get_ident()

    def _handle_is_current(self, version: int) -> bool:
        """Whether the handle may be used now, the commit counter being ``version``."""
        return (self._handle is not None
                and (version == self._handle_version or self.module.sees_other_commits)
                and not (self.module.thread_bound
                         and self._handle_thread != threading.get_ident()))

    def drop_handle(self) -> None:
        """Close the handle reads go through (the next read opens one)."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self.module.close(handle, self.path,
                              writable=self.module.keeps_handle and not self.read_only)

    def change_marker(self) -> Hashable:
        """The number of commits applied by other connections (and recoveries) so far;
        read-only, with the journal read as overlay (a journal appearing is a commit)."""
        if self.closed:
            raise ClosedError(self.path)
        self._locks.share()
        try:
            if self.read_only:
                self._load_overlay()
                return self._locks.count(), self._overlay_of
            return self._locks.count() - self._own_commits
        finally:
            self._locks.unshare()

    # -- transactions ------------------------------------------------------------------------

    def begin(self) -> None:
        if self.read_only:
            raise ReadOnlyError(self.path, "write")
        self._hold_still()
        self.changes = {}

    def _hold_still(self) -> None:
        """Take the write lock, so that no other process commits; recover a dead
        writer's journal (read-only: read it as overlay) and make the handle current."""
        if self.closed:
            raise ClosedError(self.path)
        self._write_lock.lock(self.path)
        try:
            if self.read_only:
                self._locks.share()
                try:
                    self._load_overlay()
                finally:
                    self._locks.unshare()
            elif self._journal.exists() or rewrite_pending(self.path):   # a writer died
                self._recover()
            self._refresh()
        except BaseException:
            self._write_lock.release()
            raise

    def begin_read(self) -> None:
        """Begin a snapshot: the DBM modules keep no versions, so it holds the write lock
        (other processes' reads go on; their writes wait for :meth:`end_read`)."""
        self._hold_still()
        self._held_still = True

    def end_read(self) -> None:
        if self._held_still:
            self._held_still = False
            self._write_lock.release()

    def commit(self) -> None:
        changes, self.changes = self.changes, None
        committed = not changes     # nothing to write: committed as it is
        try:
            if changes:
                # The commit point: once the journal is in place, the transaction is
                # applied, by this process now or by the next writer to find it.
                journal.write(self._journal.path, changes, fsync=self._fsync)
                committed = True
                self._apply(changes, again=False)
                self._own_commits += 1
        finally:
            if changes is not None:
                self._end(committed)

    def rollback(self) -> None:
        if self.changes is not None:
            self.changes = None
            self._end(committed=False)

    def _end(self, committed: bool) -> None:
        try:
            self._on_end(committed)
        finally:
            self._write_lock.release()

    def _recover(self) -> None:
        """Finish a dead writer's journal: apply it if it passes its checks, else move it
        aside (kept, reported with a warning and by :meth:`problems`).

        A rewrite (vacuum) that reached its commit point is finished first; it never
        runs with a journal left. The caller holds the write lock.
        """
        if rewrite_pending(self.path):
            self._finish_rewrite(lambda: self.module.finish_rewrite(self.path))
        try:
            changes = self._journal.read()
        except CorruptionError as error:
            self._journal.set_aside(error, fsync=self._fsync)
            return
        if changes is not None:
            self._apply(changes, again=True)

    def _apply(self, changes: journal.Changes, *, again: bool) -> None:
        """Apply the journal's ``changes`` to the database, then delete the journal.

        ``again``: the journal was found on disk, left by a writer that died. The
        caller holds the write lock. Readers are kept out (exclusive apply lock)
        from before the first change until the journal is gone. Every step may be
        repeated after a crash: puts and deletes are idempotent.
        """
        self._locks.exclude()
        try:
            version = self._locks.count()
            # Counted first, so that every reader reopens its handle after this apply,
            # even one interrupted and finished by another process.
            self._locks.set_count(version + 1)
            if self.module.before_apply(self.path, again=again, fsync=self._fsync):
                self.drop_handle()
            own = (self.module.keeps_handle and not self.read_only
                   and self._handle_is_current(version))
            db = self._handle if own else self.module.open(self.path, "w")
            try:
                self.module.write(db, changes)
                self.module.sync(db)
            except BaseException:
                if own:     # half written: never to be written again (recovery will)
                    self._handle = None
                    self.module.abandon(db)
                raise
            finally:
                if not own:
                    self.module.close(db, self.path, writable=True)
            if own:
                self._handle_version = version + 1
            if self._fsync:
                for name in self.module.files(self.path):
                    if os.path.exists(name):
                        fsync_file(name)
                fsync_directory(self.path)
            self.module.after_apply(self.path, fsync=self._fsync)
            journal.remove(self._journal.path, fsync=self._fsync)
        finally:
            self._locks.unexclude()

    # -- vacuum ------------------------------------------------------------------------------

    def vacuum(self, derived: bytes, derive: Callable[[Any, bytes], bytes]) -> int:
        """Compact in place where the module can (dbm.gnu, dbm.sqlite3); rewrite the
        database otherwise (dbm.dumb, dbm.ndbm): every live entry into a new database
        beside it, then put in its place so that a crash at any moment leaves the old or
        the new one whole (docs/format.md, "Vacuum"). Readers wait only while files are
        swapped. Returns how many bytes the files shrank by.

        ``derived``: a key whose value depends on the database's entries (the module's
        tally): a rewrite does not copy it but sets it to ``derive(new database, old
        value)``, with the key already present (empty) in the new database.
        """
        if self.read_only:
            raise ReadOnlyError(self.path, "vacuum")
        before = size_of(*self.module.files(self.path))
        self.begin()    # the write lock; a dead writer's journal or rewrite finished
        try:
            if not self._compact():
                self._rewrite(derived, derive)
        finally:
            self.rollback()
        return before - size_of(*self.module.files(self.path))

    def _compact(self) -> bool:
        """Compact the database in place, if its module can; under the write lock."""
        self._locks.exclude()   # no reader reads while the files change under it
        try:
            self.drop_handle()
            db = self.module.open(self.path, "w")
            try:
                return self.module.compact(db)
            finally:
                self.module.close(db, self.path, writable=True)
        finally:
            self._locks.unexclude()

    def _rewrite(self, derived: bytes, derive: Callable[[Any, bytes], bytes]) -> None:
        """Write every live entry into a new database and put it in place of this one;
        under the write lock. Readers go on reading the old one meanwhile."""
        self._refresh()
        folder, new = self.module.start_rewrite(self.path)
        try:
            for key in self._handle.keys():  # noqa: SIM118 (ndbm handles are not iterable)
                value = self._handle[key]
                if value and key != derived:  # b"": deleted (see DumbModule.delete)
                    new[key] = value
            old = self.get(derived)
            if old is not None:
                new[derived] = b""    # counted as an entry of its own
                new[derived] = derive(new, old)
        except BaseException:
            self.module.abandon(new)
            remove_rewrite_leftovers(self.path)
            raise
        self._finish_rewrite(lambda: self.module.end_rewrite(self.path, folder, new))

    def _finish_rewrite(self, finish: Callable[[], object]) -> None:
        """Run ``finish`` (which puts a rewritten database in place) with readers kept out,
        counted as a commit so that every open handle is reopened."""
        self._locks.exclude()
        try:
            self._locks.set_count(self._locks.count() + 1)
            self._own_commits += 1
            self.drop_handle()
            finish()
        finally:
            self._locks.unexclude()

    # -- lifetime ----------------------------------------------------------------------------

    def after_fork(self) -> None:
        """In a forked child: the parent's locks and handle are the parent's."""
        if self.closed:
            return
        if self._handle is not None:
            INHERITED.append(self._handle)
        self._write_lock.abandon()
        self._locks.abandon()
        self._make_locks()
        self._handle = None
        self.changes = None
        self._held_still = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.rollback()
        finally:
            self.changes = None
            self._held_still = False
            self.drop_handle()
            self._write_lock.close()
            self._locks.close()
