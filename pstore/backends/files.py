"""File handling shared by the file-based backends: flag checks, private files, lock files.

Nothing here knows about records or keys; :mod:`.sqlite` and :mod:`.dbm` both
build on it so that the two backends behave alike where a user can tell.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from .._blake2 import blake2b
from ..errors import LockTimeoutError, UnsafeFileError

try:
    import fcntl
except ImportError:     # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["INHERITED", "ApplyLocks", "FileLock", "create_private", "fsync_directory",
           "key_lock_file",
           "fsync_file", "open_side_file", "owned_by", "remove_files", "replace_file",
           "require_existing", "store_owner"]

#: Handles (database connections, open files) inherited from a parent process after
#: ``fork()``. Kept referenced forever: closing them in the child could act on the parent's.
INHERITED: list[object] = []

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


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


def store_owner(files: Iterable[str]) -> int:
    """The uid owning the first of ``files`` that exists (the store's own data files; a
    link there is the user's choice of place), else this process's effective uid (a
    store about to be created)."""
    for name in files:
        try:
            return os.stat(name).st_uid
        except FileNotFoundError:
            continue
    return os.geteuid() if hasattr(os, "geteuid") else 0


def owned_by(info: os.stat_result, owner: int | None) -> bool:
    """Whether the file ``info`` describes is ``owner``'s (None: anyone's) or root's:
    whoever can plant a root-owned file can change the store's own files as well."""
    return owner is None or info.st_uid in (owner, 0)


def _check_opened(fd: int, path: str, owner: int | None) -> None:
    """Close ``fd`` and raise UnsafeFileError unless it is a regular file owned by ``owner``."""
    info = os.fstat(fd)
    reason = None
    if not stat.S_ISREG(info.st_mode):
        reason = "not a regular file"
    elif not owned_by(info, owner):
        reason = f"owned by uid {info.st_uid}, the store by uid {owner}"
    if reason is not None:
        os.close(fd)
        raise UnsafeFileError(path, reason)


def open_side_file(path: str, owner: int | None) -> int:
    """Open (creating it, mode 0600, if missing) a file beside the store: never through a
    symbolic link, only a regular file owned by ``owner`` (None: any owner).

    Opened for reading and writing, or for reading only if the user may only read it.
    A file this call creates is this process's, whoever owns the store (root opening
    a user's store). Raises :class:`~pstore.errors.UnsafeFileError` naming the file
    otherwise.
    """
    flags = _NOFOLLOW | _CLOEXEC
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | flags, 0o600)
            owner = None
        except FileExistsError:     # (O_EXCL: also a link, dangling or not; refused below)
            try:
                fd = os.open(path, os.O_RDWR | flags)
            except PermissionError:     # a store the user may only read
                fd = os.open(path, os.O_RDONLY | flags)
    except PermissionError:
        raise UnsafeFileError(path, _who_owns(path) + ", which this user may not read") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeFileError(path, "a symbolic link") from None
        if error.errno == errno.EISDIR:
            raise UnsafeFileError(path, "not a regular file (a directory)") from None
        raise
    _check_opened(fd, path, owner)
    return fd


def _who_owns(path: str) -> str:
    try:
        return f"owned by uid {os.lstat(path).st_uid}"
    except OSError:
        return "not accessible"


def replace_file(path: str, chunks: Iterable[bytes], *, fsync: bool) -> None:
    """Write ``chunks`` as the new content of ``path`` (mode 0600), atomically.

    Written to a new file under a random name beside it (``O_EXCL|O_NOFOLLOW``: never
    through a link someone planted), then renamed over ``path``: a symbolic link at
    ``path`` is replaced, not followed. With ``fsync``, the file and its directory
    entry are on disk when this returns.
    """
    temporary = f"{path}.tmp-{os.urandom(8).hex()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
    try:
        with open(fd, "wb") as file:
            file.writelines(chunks)
            file.flush()
            if fsync:
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fsync_directory(path)


def remove_files(names: Iterable[str], lock: FileLock, store_path: str) -> None:
    """Flag 'n' over files that are not a store to empty: unlink each of ``names`` that
    exists (a link is removed itself, never followed), holding ``lock`` meanwhile."""
    lock.lock(store_path)
    try:
        for name in names:
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
    finally:
        lock.release()


def fsync_file(path: str) -> None:
    """Make the content of the file ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | _CLOEXEC)   # the store's own files: a link is the user's
    try:
        os.fsync(fd)
    finally:
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


_FACTS: dict[str, str | int] = {}
#: Bytes every holder writes into a lock file: the JSON padded with spaces, so that a write
#: always covers the whole previous record and the file is never truncated.
_HOLDER_SIZE = 4096
_holder_cache: list[Any] = [None, b""]     # [second, the record written in that second]


def _process_facts() -> dict[str, str | int]:
    """pid, host and program of this process, for lock files (worked out once per process:
    a transaction takes the lock each time)."""
    if _FACTS.get("pid") != os.getpid():   # first use, or a forked child
        _FACTS.update(pid=os.getpid(), host=_host_name(),
                      program=" ".join(sys.argv)[:200] or sys.executable)
        _holder_cache[0] = None
    return _FACTS


def _host_name() -> str:
    """This machine's name (``socket.gethostname()``, without importing socket on POSIX)."""
    if hasattr(os, "uname"):
        return os.uname().nodename
    import socket
    return socket.gethostname()


def _json_object(facts: dict[str, str | int]) -> str:
    """``json.dumps(facts)`` of a flat dict of str and int, character for character: the
    holder record is written at every writer's first commit, where importing ``json``
    took a sixth of a new store's first open (the record is read back with ``json``)."""
    return "{" + ", ".join(f"{_json_string(name)}: "
                           f"{value if isinstance(value, int) else _json_string(value)}"
                           for name, value in facts.items()) + "}"


#: The JSON escapes of the characters that have a short one.
_JSON_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n",
                 "\r": "\\r", "\t": "\\t"}


def _json_string(text: str) -> str:
    """``text`` as ``json.dumps`` writes a str: ASCII, anything else as ``\\uXXXX``
    (surrogate pairs past U+FFFF)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    out = []
    for char in text:
        code = ord(char)
        if char in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[char])
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 | code >> 10:04x}\\u{0xDC00 | code & 0x3FF:04x}")
        else:
            out.append(f"\\u{code:04x}")
    return '"' + "".join(out) + '"'


def _holder_record() -> bytes:
    """What a holder writes into a lock file now (made once a second: every commit takes
    the lock)."""
    facts = _process_facts()
    second = int(time.time())
    if _holder_cache[0] != second:
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        # ASCII JSON of a program cut to 200 characters: far below _HOLDER_SIZE.
        data = _json_object({**facts, "since": since}).encode("ascii")[:_HOLDER_SIZE]
        _holder_cache[:] = [second, data.ljust(_HOLDER_SIZE)]
    return _holder_cache[1]


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
    holds no data. It is opened with :func:`open_side_file`: never through a
    symbolic link, and only if it is a regular file owned by ``owner``.

    With ``names_holder``, an exclusive holder writes who it is (pid, host,
    program, when it took the lock) into the file, and a
    :class:`~pstore.errors.LockTimeoutError` raised by :meth:`lock` quotes it.
    """

    def __init__(self, path: str, timeout: float, *, longest_pause: float = 0.02,
                 owner: int | None = None, names_holder: bool = False) -> None:
        """``longest_pause``: the longest sleep between two attempts while waiting.

        Waiting polls (a blocking ``flock`` cannot time out); locks held only briefly
        but often need short pauses, or a waiter seldom finds them free.
        """
        self.path = path
        self._timeout = timeout
        self._longest_pause = longest_pause
        self._owner = owner
        self._names_holder = names_holder
        self._fd: int | None = None
        self._portable: Any = None   # a filelock.FileLock (imported only where it is used)
        if fcntl is None:
            import filelock  # only where flock is missing

            self._portable = filelock.FileLock(path, timeout=timeout, mode=0o600,
                                               thread_local=False)

    def fileno(self) -> int:
        """The descriptor of the lock file, for data kept in it (read-only if the user may
        only read the file: flock works on it, writes to it fail)."""
        if self._fd is None:
            self._fd = open_side_file(self.path, self._owner)
        return self._fd

    def lock(self, store_path: str, shared: bool = False) -> None:
        """:meth:`acquire`, raising :class:`~pstore.errors.LockTimeoutError` for the store
        at ``store_path`` (naming the holder when it wrote itself down) if it times out."""
        if not self.acquire(shared=shared):
            raise LockTimeoutError(store_path, self._timeout, self.holder())

    def holder(self) -> str | None:
        """Who last took the lock exclusively, as it wrote itself down; None if unknown."""
        if self._fd is None:
            return None
        try:
            import json

            facts = json.loads(os.pread(self._fd, _HOLDER_SIZE, 0).decode("utf-8"))
            return (f"process {int(facts['pid'])} on {str(facts['host'])!r} "
                    f"({str(facts['program'])!r}, holding it since {facts['since']})")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _write_holder(self, fd: int) -> None:
        try:
            os.pwrite(fd, _holder_record(), 0)
        except OSError:     # opened read-only: the lock still works, only unnamed
            pass

    def acquire(self, shared: bool = False, wait: bool = True) -> bool:
        """Take the lock, waiting up to the timeout (not at all if not ``wait``).

        Returns False if it could not be taken.
        """
        if self._portable is not None:
            import filelock

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
                if self._names_holder and not shared:
                    self._write_holder(fd)
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


class ApplyLocks:
    """The gate, the apply lock and the commit counter: readers against an applying writer.

    ``<path>.commits`` is held shared by readers for each read and exclusively by a
    writer only while it applies a journal, so readers wait for that apply phase and
    nothing else, and never see half of it. Its first 8 bytes count the applies.
    ``<path>.gate`` is passed (shared) by readers on their way to the apply lock and
    held (exclusive) by an applying writer, so that no new reader slips in while it
    waits for the readers already in: without it, readers back to back starve it.
    """

    def __init__(self, path: str, timeout: float, owner: int) -> None:
        """``path``: the store's; its ``.commits`` and ``.gate`` files are used, owned by
        ``owner`` (see :func:`open_side_file`)."""
        self._path = path
        # Held for microseconds (a read) or milliseconds (an apply), very often: a
        # waiter must retry often to catch the moments it is free.
        self._counter = FileLock(path + ".commits", timeout, longest_pause=0.0002, owner=owner)
        self._gate = FileLock(path + ".gate", timeout, longest_pause=0.0002, owner=owner)

    def share(self) -> None:
        """Take the apply lock shared, through the gate (release with :meth:`unshare`)."""
        self._gate.lock(self._path, shared=True)
        try:
            self._counter.lock(self._path, shared=True)
        finally:
            self._gate.release()

    def unshare(self) -> None:
        self._counter.release()

    def exclude(self) -> None:
        """Take the gate and the apply lock exclusively (release with :meth:`unexclude`)."""
        self._gate.lock(self._path)
        try:
            self._counter.lock(self._path)
        except BaseException:
            self._gate.release()
            raise

    def unexclude(self) -> None:
        self._counter.release()
        self._gate.release()

    def count(self) -> int:
        """The number of applies so far."""
        return int.from_bytes(os.pread(self._counter.fileno(), 8, 0), "big")

    def set_count(self, count: int) -> None:
        """Record ``count`` applies; called holding the apply lock exclusively."""
        os.pwrite(self._counter.fileno(), count.to_bytes(8, "big"), 0)

    def abandon(self) -> None:
        self._counter.abandon()
        self._gate.abandon()

    def close(self) -> None:
        self._counter.close()
        self._gate.close()


@contextmanager
def key_lock_file(store_path: str, key: str, timeout: float) -> Iterator[None]:
    """Hold, across processes, the lock of one key of the store at ``store_path``.

    The file backends' :meth:`~pstore.backends.base.Backend.key_lock`: one lock file
    per key (named by a digest of the key) in the folder ``PATH.keylocks``, created
    mode 0700 on first need and refused (:class:`~pstore.errors.UnsafeFileError`) if it
    is not a real folder of the store's owner: a planted symlink is never followed. The
    lock files are opened as every side file is (:func:`open_side_file`) and name their
    holder. They stay: removing a lock file another process may be waiting on would
    let two processes hold "the" lock at once.
    """
    folder = store_path + ".keylocks"
    owner = store_owner([store_path])
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or not owned_by(info, owner):
        raise UnsafeFileError(folder, "the key-lock folder is not a folder of the store's "
                                      "owner (a symbolic link, or another file)")
    name = blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    lock = FileLock(os.path.join(folder, name), timeout, owner=owner, names_holder=True)
    try:
        lock.lock(store_path)
        try:
            yield
        finally:
            lock.release()
    finally:
        lock.close()
