"""File handling shared by the file-based backends: flag checks, private files, lock files.

Nothing here knows about records or keys; :mod:`.sqlite` and :mod:`.dbm` both
build on it so that the two backends behave alike where a user can tell.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import filelock

from ..errors import LockTimeoutError

try:
    import fcntl
except ImportError:     # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["FileLock", "create_private", "fsync_directory", "key_lock_file", "require_existing"]


def require_existing(path: str, flag: str, exists: Callable[[], bool]) -> None:
    """Raise ``FileNotFoundError`` for flag 'r' or 'w' when ``exists()`` is false."""
    if flag in ("r", "w") and not exists():
        raise FileNotFoundError(errno.ENOENT, "no pstore store at this path", path)


def create_private(path: str) -> None:
    """Create ``path`` as an empty file readable by its owner only, unless it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def fsync_directory(path: str) -> None:
    """Make the creation, renaming or removal of entries of the directory of ``path`` durable."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:     # Windows cannot open directories; its renames need no fsync here.
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileLock:
    """A cross-process lock on the file ``path``: exclusive, or shared among many holders.

    On POSIX it is ``flock(2)`` on a descriptor this object keeps open, which is
    what ``filelock.FileLock`` does too, so the two exclude each other on the
    same file. Two ``FileLock`` objects on one file exclude each other even
    inside one process (flock locks belong to the open file, not the process).
    ``filelock.FileLock`` itself is used where ``fcntl`` is missing; shared
    acquisitions are then exclusive (correct, only less concurrent). Not
    ``filelock`` everywhere: its bookkeeping costs about 100 us per
    acquire/release, and its ``ReadWriteLock`` (an SQLite transaction) over
    1 ms, where a reader takes the lock for every read.

    The file is created (mode 0600) if missing, even by a read-only store: it
    holds no data.
    """

    def __init__(self, path: str, timeout: float, *, longest_pause: float = 0.02) -> None:
        """``longest_pause``: the longest sleep between two attempts while waiting.

        Waiting polls (a blocking ``flock`` cannot time out); locks held only briefly
        but often need short pauses, or a waiter seldom finds them free.
        """
        self.path = path
        self._timeout = timeout
        self._longest_pause = longest_pause
        self._fd: int | None = None
        self._portable = (filelock.FileLock(path, timeout=timeout, mode=0o600,
                                            thread_local=False) if fcntl is None else None)

    def fileno(self) -> int:
        """The descriptor of the lock file, for data kept in it (read-only if the user may
        only read the file: flock works on it, writes to it fail)."""
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except PermissionError:     # a store the user may only read
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def acquire(self, shared: bool = False, wait: bool = True) -> bool:
        """Take the lock, waiting up to the timeout (not at all if not ``wait``).

        Returns False if it could not be taken.
        """
        if self._portable is not None:
            try:
                self._portable.acquire(timeout=self._timeout if wait else 0)
            except filelock.Timeout:
                return False
            return True
        fd = self.fileno()
        operation = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + (self._timeout if wait else 0)
        pause = min(0.0005, self._longest_pause)
        while True:
            try:
                fcntl.flock(fd, operation)
                return True
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                time.sleep(min(pause, remaining))
                pause = min(pause * 2, self._longest_pause)

    def release(self) -> None:
        if self._portable is not None:
            self._portable.release()
        elif self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def abandon(self) -> None:
        """In a forked child: let go of the descriptor without unlocking the parent's lock.

        flock locks belong to the open file description, which parent and child
        share: unlocking here would unlock the parent; closing does not.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        if self._portable is None and self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextmanager
def key_lock_file(store_path: str, key: str, timeout: float) -> Iterator[None]:
    """Hold, across processes, the lock of one key of the store at ``store_path``.

    The file backends' :meth:`~pstore.backends.base.Backend.key_lock`: one lock file
    per key (named by a digest of the key) in the folder ``PATH.keylocks``, created
    mode 0700 on first need and refused if it is not a real folder of this user's (a
    planted symlink is never followed). The files stay: removing a lock file another
    process may be waiting on would let two processes hold "the" lock at once.
    """
    folder = store_path + ".keylocks"
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise FileExistsError(errno.EEXIST, "the key-lock folder of a pstore store is not a "
                              "folder of this user's (a symlink or another file?)", folder)
    name = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    lock = FileLock(os.path.join(folder, name), timeout)
    try:
        if not lock.acquire():
            raise LockTimeoutError(store_path, timeout)
        try:
            yield
        finally:
            lock.release()
    finally:
        lock.close()
