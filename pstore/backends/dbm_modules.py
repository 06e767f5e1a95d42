"""Adapters over the standard library's ``dbm`` modules, for :mod:`.dbm` and :mod:`.shelf`.

Each module differs in flags, file names, how long a handle stays valid and how
it survives a crash; one :class:`Module` object per module says how. Some of it
needs the modules' private attributes: ``dbm.sqlite3``'s connection ``_cx`` (one
transaction for a whole apply) and ``dbm.dumb``'s ``_modified`` flag (so that
closing a synced handle does not write a stale index). Their presence on this
Python is pinned by tests (tests/backends/test_dbm_modules.py).
"""

from __future__ import annotations

import importlib
import os
import secrets
import shutil
import sqlite3
import stat
import zlib
from typing import Any

from ..errors import CorruptionError, FormatError, UnsafeFileError
from . import journal, size_of, whichdb  # the last two in the package: detect_backend's
from .files import fsync_directory, fsync_file, owned_by, replace_file, store_owner

__all__ = ["MODULES", "REWRITE_FOLDER", "SUFFIXES", "DumbModule", "Module", "SQLiteModule",
           "choose_module", "load_module", "remove_rewrite_leftovers", "rewrite_pending",
           "whichdb"]

#: The dbm modules this backend can use, best first: plain ``backend="dbm"`` takes the
#: first one this Python has (the order of the standard library's own ``dbm.open``).
MODULES = ("dbm.sqlite3", "dbm.gnu", "dbm.ndbm", "dbm.dumb")

#: The file names each module gives a database at ``path``: path + suffix.
SUFFIXES = {
    "dbm.sqlite3": ["", "-wal", "-shm", "-journal"],
    "dbm.gnu": [""],
    "dbm.ndbm": [".db", ".pag", ".dir"],
    # .dir.saved and the .tmp files: see DumbModule.
    "dbm.dumb": [".dat", ".dir", ".bak", ".dir.saved", ".dir.tmp", ".dir.saved.tmp"],
}


class Module:
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
        """A handle on the database at ``path``; while a rewrite is to be finished (see
        :meth:`finish_rewrite`), on the rewritten one (only a writer that has finished
        it writes, and then it is gone)."""
        if flag in ("r", "w") and rewrite_pending(path):
            path = os.path.join(path + REWRITE_FOLDER, "new")
        return self._open(path, flag)

    def _open(self, path: str, flag: str) -> Any:
        # dbm.gnu locks the file itself and would refuse a second opener: 'u' turns that
        # off, pstore's own locks take its place.
        return self.module.open(path, flag + ("u" if self.name == "dbm.gnu" else ""), 0o600)

    def tally_after(self, db: Any, changes: journal.Changes) -> bytes | None:
        """The tally of the entries ``db`` will have once ``changes`` are written, where
        the module keeps its index in memory (else None: no tally is kept for it)."""
        return None

    def tally(self, db: Any) -> bytes | None:
        """The tally of the entries of ``db`` (as :meth:`tally_after`)."""
        return None

    def files(self, path: str) -> list[str]:
        """Every file the database at ``path`` may consist of."""
        return [path + suffix for suffix in SUFFIXES[self.name]]

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

    def compact(self, db: Any) -> bool:
        """Give the free space of the database files back to the file system, in place;
        False if the module cannot (the caller holds every lock)."""
        reorganize = getattr(db, "reorganize", None)    # dbm.gnu
        if reorganize is None:
            return False
        reorganize()
        return True

    def after_apply(self, path: str, *, fsync: bool) -> None:
        """Called once a journal is applied and synced, before the journal is deleted."""

    # Rewriting (vacuum where the module cannot compact in place); docs/format.md says
    # the order of the steps and why a crash at any of them leaves a whole database.

    def start_rewrite(self, path: str) -> tuple[str, Any]:
        """``(folder, handle)``: a new empty database ``new`` in a new private folder beside
        ``path`` (mode 0700, a random name: nobody else can have put a file or link
        there), to write every live entry into, then :meth:`end_rewrite`."""
        remove_rewrite_leftovers(path)
        folder = f"{path}{REWRITE_FOLDER}-{secrets.token_hex(8)}"
        os.mkdir(folder, 0o700)
        return folder, self._open(os.path.join(folder, "new"), "n")

    def end_rewrite(self, path: str, folder: str, db: Any) -> None:
        """Close and fsync the database written into ``folder``, then make it the one at
        ``path``: the folder renamed to ``path + REWRITE_FOLDER`` is the commit point,
        after which :meth:`finish_rewrite` completes the move. The caller holds the write
        lock and the exclusive apply lock."""
        new = os.path.join(folder, "new")
        self.close(db, new, writable=True)
        written = [name for name in self.files(new) if os.path.exists(name)]
        for name in written:
            fsync_file(name)
        fsync_directory(new)
        try:    # finish_rewrite links the files into place: known to work before committing
            os.link(written[0], new + ".probe", follow_symlinks=False)
        except OSError as error:
            raise NotImplementedError(f"cannot vacuum {path!r}: its file system has no hard "
                                      f"links ({error.strerror}); `pstore copy` makes a "
                                      f"compact copy") from error
        os.unlink(new + ".probe")
        os.rename(folder, path + REWRITE_FOLDER)
        fsync_directory(path)
        self.finish_rewrite(path)

    def finish_rewrite(self, path: str) -> bool:
        """Put the files of a committed rewrite in place of the database's; False if there
        is none. Every step may be repeated after a crash. The caller holds the write
        lock and the exclusive apply lock."""
        folder = path + REWRITE_FOLDER
        if not rewrite_pending(path):
            return False
        new = os.path.join(folder, "new")
        for suffix in SUFFIXES[self.name]:
            if not os.path.lexists(new + suffix):
                # A file the new database does not have (dbm.dumb's .bak): the old one's
                # would not match it.
                _unlink_if_there(path + suffix)
                continue
            # A link, not a rename: the folder keeps the whole new database, for readers,
            # until every file is in place.
            temporary = f"{path}{suffix}{REWRITE_FOLDER}-{secrets.token_hex(8)}"
            os.link(new + suffix, temporary, follow_symlinks=False)
            os.replace(temporary, path + suffix)
        fsync_directory(path)
        finished = f"{folder}-{secrets.token_hex(8)}"
        os.rename(folder, finished)     # gone at once for readers; deleted next
        fsync_directory(path)
        remove_rewrite_leftovers(path)
        return True


class SQLiteModule(Module):
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

    def compact(self, db: Any) -> bool:
        connection = getattr(db, "_cx", None)
        if connection is None:
            return False
        connection.execute("VACUUM")
        return True

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


#: The folder beside a database (path + this) holding a rewritten database, complete,
#: whose files are being put in place of the database's.
REWRITE_FOLDER = ".vacuum"


def rewrite_pending(path: str) -> bool:
    """Whether a committed rewrite of the database at ``path`` is to be finished.

    Raises :class:`~pstore.errors.UnsafeFileError` for a folder there that is not the
    store owner's (or root's): a database planted there is never read.
    """
    folder = path + REWRITE_FOLDER
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return False
    owner = store_owner([path + suffix for suffixes in SUFFIXES.values() for suffix in suffixes])
    if not owned_by(info, owner):
        raise UnsafeFileError(folder, f"owned by uid {info.st_uid}, the store by uid {owner}")
    return True


def remove_rewrite_leftovers(path: str) -> None:
    """Delete the folders of rewrites that never reached their commit point or were
    finished (``path.vacuum-*``); never through a link. Under the write lock."""
    directory, base = os.path.split(os.path.abspath(path))
    # The folders, and the links finish_rewrite makes before renaming them into place.
    prefixes = {base + suffix + REWRITE_FOLDER + "-": suffix == ""
                for suffixes in SUFFIXES.values() for suffix in suffixes}
    for entry in os.scandir(directory):
        for prefix, is_folder in prefixes.items():
            rest = entry.name[len(prefix):]
            if not (entry.name.startswith(prefix) and len(rest) == 16
                    and all(digit in "0123456789abcdef" for digit in rest)):
                continue
            if is_folder and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            elif entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)


def _unlink_if_there(name: str) -> None:
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


class DumbModule(Module):
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

    def _open(self, path: str, flag: str) -> Any:
        index = path + ".dir"
        if flag != "n" and not os.path.exists(path + ".dir.saved"):
            data_size = size_of(path + ".dat")
            if data_size and not size_of(index):
                raise CorruptionError(index, f"the dbm.dumb index is missing or empty, while "
                                             f"its data file holds {data_size} bytes")
        try:
            if flag == "r" and os.path.exists(path + ".dir.saved"):
                # An apply was cut short: its journal is still there, and the index it
                # saved first is the one the database had before it. A read-only
                # opener may not put it back (a writer does, in before_apply): it
                # reads that index instead of the one the apply was rewriting.
                return _saved_index_database(self.module)(os.fsencode(path), 0o600, "r")
            return super()._open(path, flag)
        except (SyntaxError, ValueError, TypeError) as error:   # a garbled index line
            raise CorruptionError(index, f"the dbm.dumb index cannot be read ({error})") \
                from error

    # The index is in memory, and dbm.dumb rewrites all of it at every sync: a tally over
    # its keys costs a fraction of that. The count catches an index cut short at a line
    # boundary, which still parses; the sum of the keys' CRC-32s an index entry whose
    # key a flipped byte renamed (the count stays right, the key would vanish).
    def tally_after(self, db: Any, changes: journal.Changes) -> bytes | None:
        keys = list(db.keys())
        keys += [key for key, value in changes.items() if value is not None and key not in db]
        return _tally(keys)

    def tally(self, db: Any) -> bytes | None:
        # A data file cut short reads as short values (b"": a deleted entry) without an
        # error from dbm.dumb: its size is checked against the entries' extent here.
        extents = [position + size for position, size in db._index.values()]
        data_file = os.fsdecode(db._datfile)
        size = os.stat(data_file).st_size
        if extents and max(extents) > size:
            raise CorruptionError(data_file, f"the dbm.dumb data file is {size} bytes, its "
                                             f"index has entries up to byte {max(extents)} "
                                             f"(a truncated data file)")
        return _tally(list(db.keys()))

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


def _saved_index_database(module: Any) -> Any:
    """A dbm.dumb database class that reads its index from ``.dir.saved``."""
    class SavedIndexDatabase(module._Database):
        def _update(self, flag: str) -> None:
            self._dirfile: bytes = self._dirfile + b".saved"
            super()._update(flag)
    return SavedIndexDatabase


def _copy_private(source: str, target: str, *, fsync: bool) -> None:
    """Replace ``target`` atomically by a copy of ``source``, mode 0600."""
    with open(source, "rb") as file:
        content = file.read()
    replace_file(target, [content], fsync=fsync)


def _tally(keys: list[bytes]) -> bytes:
    """``<count>/<sum of the keys' CRC-32s, hex>``: what ``m:check`` holds for dbm.dumb."""
    return b"%d/%x" % (len(keys), sum(map(zlib.crc32, keys)))


def load_module(name: str, path: str) -> Module:
    try:
        return {"dbm.dumb": DumbModule, "dbm.sqlite3": SQLiteModule}.get(name, Module)(name)
    except ImportError:
        raise FormatError(path, f"it needs the module {name}, which this Python lacks") from None


def choose_module(path: str, flag: str, variant: str | None) -> Module:
    """The module for ``path``: the one named, else the one that wrote it, else the best.

    Also used by :mod:`.shelf`. Raises ``ValueError`` for an unknown name and
    :class:`~pstore.errors.FormatError` for a file of another or no dbm module.
    """
    if variant is not None and variant not in MODULES:
        raise ValueError(f"unknown dbm module {variant!r}; known: {', '.join(MODULES)}")
    found = None if flag == "n" else whichdb(path)
    if found == "":
        raise FormatError(path, "not a database of any dbm module")
    if found is not None and variant is not None and found != variant:
        raise FormatError(path, f"a {found} database, not a {variant} one")
    name = variant or found
    if name is not None:
        return load_module(name, path)
    for name in MODULES:
        try:
            return load_module(name, path)
        except FormatError:
            continue
    raise AssertionError("dbm.dumb is always importable")


