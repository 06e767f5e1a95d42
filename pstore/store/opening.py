"""``pstore.open``: its options checked, the backend chosen and opened, a Store made.

Everything a user passes to :func:`open` is checked here, once, before anything is
opened (:class:`~pstore.errors.ArgumentError` names a bad option); a Store receives
its options checked. :func:`reopen` is what a pickled Store calls in the process it
arrives in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from .. import engine
from ..backends import detect_backend, open_backend
from ..errors import ArgumentError
from . import blobio
from .renames import Renames
from .signing import signer_for
from .store import DEFAULT_BLOB_THRESHOLD, DEFAULT_MAX_RECORD_SIZE, Store

__all__ = ["open", "reopen", "DEFAULT_LOCK_TIMEOUT", "DEFAULT_BLOB_THRESHOLD",
           "DEFAULT_MAX_RECORD_SIZE"]

#: Seconds a write waits for another process's write transaction by default.
DEFAULT_LOCK_TIMEOUT = 60.0

_FLAGS = ("r", "w", "c", "n")


def open(path: str | bytes | os.PathLike[str] | os.PathLike[bytes], flag: str = "c", *,
         backend: str | None = None,
         protocol: int = 5, writeback: bool = False,
         lock_timeout: float = DEFAULT_LOCK_TIMEOUT, fsync: bool = False,
         blob_threshold: int | None = DEFAULT_BLOB_THRESHOLD, compression: str | None = None,
         readonly_buffers: bool = False,
         max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
         key: bytes | None = None, allow: str | Iterable[str] = (),
         renames: Mapping[str, str] | None = None) -> Store:
    """Open the store at ``path`` and return a :class:`Store`.

    ``flag``: 'r' read-only (writes nothing at all, not even to the file's header),
    'w' read-write on an existing store, 'c' create it if missing (default),
    'n' empty the store (in one transaction, under the write lock; a new one if
    missing). ``path``: str, bytes or os.PathLike. A missing file with 'r' or 'w' raises
    ``FileNotFoundError``; a file that is not a pstore store (or one written by a
    newer pstore) raises :class:`~pstore.errors.FormatError`. New files are
    readable by their owner only.

    ``backend``: ``"sqlite"``, ``"dbm"`` (``"dbm:dbm.dumb"`` names the module),
    ``"postgresql"`` or ``"shelve"`` (read-only, a stdlib shelve file); None
    (default): the one a ``postgresql://`` URL names, else that of the store already
    at ``path``, told from its files, else ``"sqlite"`` (``docs/backends.md``).

    ``protocol``: the pickle protocol records are written with (0 to 5, -1 for 5).
    ``writeback``: keep every value read or assigned and, at :meth:`Store.sync`,
    :meth:`Store.close` and the end of each :meth:`Store.transaction`, write back
    those whose pickle differs from their record's, so in-place mutations persist
    (as in ``shelve``, which rewrites them all).
    ``lock_timeout``: seconds a write waits for another process's write
    transaction before :class:`~pstore.errors.LockTimeoutError`.
    ``fsync``: False (default) -- a commit that returned survives the process being
    killed; True -- it also survives power loss and OS crashes (slower commits).
    Blobs are fsynced before their commit either way.

    Large buffers (``docs/datasets.md``): under protocol 5, every out-of-band buffer
    (``PickleBuffer``: numpy arrays, pandas frames' blocks, ...) of at least
    ``blob_threshold`` bytes (None: never) is stored once per distinct content as a
    blob beside the records, and loaded mapped into memory: copy-on-write (arrays
    come back writable; writes never reach the store) or, with
    ``readonly_buffers=True``, read-only. ``compression``: None (default),
    ``"zlib"``, ``"lzma"`` or ``"zstd"`` (``pip install 'pstore[zstd]'`` before
    Python 3.14), for the records and blobs this Store writes;
    compressed blobs are decompressed into memory instead of mapped. Any store
    reads records and blobs whatever compression wrote them.
    ``max_record_size``: a record whose payload (decompressed) is larger is refused
    with :class:`~pstore.errors.CorruptionError`, before it is decompressed.

    ``renames``: ``{"old.module.Name": "new.module.Name", "old.module": "new.module"}``,
    the names records were written with mapped to the ones to import now
    (:mod:`pstore.store.renames` gives the rules); it changes no record. A record whose
    class cannot be imported raises :class:`~pstore.errors.MissingClassError` naming the
    key, object id and ``module.name``; ``s.values(errors="skip")`` leaves such records out.

    Every record carries a digest checked on every read: damaged bytes raise
    :class:`~pstore.errors.CorruptionError` naming the key or object id.

    Safe by default (``docs/safety.md``): every record this Store writes is signed
    with ``key`` (bytes, 32 or more), else the key in the file ``$PSTORE_KEY_FILE``
    names, else the user's own key file (created on first need). A record signed by
    that key loads with full pickle semantics; one whose signature fails raises
    :class:`~pstore.errors.IntegrityError`; any other (written with another key, by
    a pstore before format version 3, or forged) loads restricted: only the data
    policy's globals and those ``allow`` names (``["pkg.mod.Name", "pkg.mod.*"]``)
    resolve, anything else raises :class:`~pstore.errors.UntrustedError`.
    ``allow="*"`` turns that off (unsafe: any record may run any code).
    """
    if flag not in _FLAGS:
        raise ArgumentError("flag", flag, "one of 'r', 'w', 'c', 'n'")
    if compression not in blobio.CODECS:
        raise ArgumentError("compression", compression, "None, 'zlib', 'lzma' or 'zstd'")
    if compression == "zstd":
        blobio.zstd_module()    # MissingModuleError naming what to install, before any write
    if blob_threshold is not None and blob_threshold < 0:
        raise ArgumentError("blob_threshold", blob_threshold, ">= 0 or None")
    if protocol == -1:
        protocol = engine.HIGHEST_PROTOCOL
    if not 0 <= protocol <= engine.HIGHEST_PROTOCOL:
        raise ArgumentError("protocol", protocol,
                            f"between 0 and {engine.HIGHEST_PROTOCOL} (or -1)")
    checked_renames = None if renames is None else Renames(renames)
    if isinstance(allow, str) and allow != "*":
        raise ArgumentError("allow", allow, "'*' or a list of 'pkg.mod.Name'/'pkg.mod.*'")
    allow = allow if isinstance(allow, str) else list(allow)
    signer = signer_for(key)
    location = os.fsdecode(path)
    if backend is None:
        backend = detect_backend(location) or "sqlite"
    opened = open_backend(backend, location, flag, lock_timeout=lock_timeout, fsync=fsync)
    try:
        store = Store(opened, protocol=protocol, writeback=writeback,
                      blob_threshold=blob_threshold, compression=compression,
                      readonly_buffers=readonly_buffers, max_record_size=max_record_size,
                      signer=signer, allow=allow, renames=checked_renames)
    except BaseException:
        opened.close()
        raise
    # What another process needs to open the same store the same way (Store.__reduce__):
    # by then it exists, so 'c' and 'n' reopen as 'w' (never emptying it again).
    store.reopen_arguments = (location, "r" if flag == "r" else "w", dict(
        backend=backend, protocol=protocol, writeback=writeback, lock_timeout=lock_timeout,
        fsync=fsync, blob_threshold=blob_threshold, compression=compression,
        readonly_buffers=readonly_buffers, max_record_size=max_record_size, allow=allow,
        renames=None if checked_renames is None else checked_renames.mapping))
    if key is not None:     # else the other process finds the same key file
        store.reopen_arguments[2]["key"] = key
    return store


def reopen(path: str, flag: str, options: dict[str, Any]) -> Store:
    """Unpickle a Store (see :meth:`Store.__reduce__ <pstore.store.Store.__reduce__>`)."""
    return open(path, flag, **options)
