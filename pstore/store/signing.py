"""The signing key: where it comes from, and what it signs with.

A Store signs every record it writes with a per-user secret (docs/safety.md, "The
key"), so that it can tell its user's own records -- loaded with full pickle
semantics -- from everything else, loaded restricted. The key is, in this order:

1. ``pstore.open(..., key=bytes)`` (32 bytes or more);
2. the file named by the environment variable ``PSTORE_KEY_FILE``;
3. a per-user file in the user data folder: ``$XDG_DATA_HOME/pstore/key`` (default
   ``~/.local/share/pstore/key``) on Linux and other Unixes,
   ``~/Library/Application Support/pstore/key`` on macOS, ``%APPDATA%\\pstore\\key`` on
   Windows -- created with 32 random bytes and mode 0600 the first time it is needed.

A key file must be a regular file (not a symbolic link) of the user running
pstore, of at least 32 bytes; anything else is a :class:`~pstore.errors.KeyFileError`.
The default file is created atomically: a temporary file (``O_EXCL|O_NOFOLLOW``)
is written, then hard-linked to the final name, which fails if another process
got there first -- then that process's key is read. Processes starting at once end
up with one key.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import TYPE_CHECKING, cast

from .._blake2 import blake2b
from ..errors import ArgumentError, KeyFileError

if TYPE_CHECKING:
    from ..backends.base import Backend, ReadableBackend

__all__ = ["FINGERPRINT_META", "KEY_FILE_VARIABLE", "MIN_KEY_SIZE", "Signer",
           "default_key_path", "made_with", "signer_for"]

#: The environment variable naming a key file.
KEY_FILE_VARIABLE = "PSTORE_KEY_FILE"
#: A key has at least this many bytes.
MIN_KEY_SIZE = 32
#: The meta entry holding the fingerprint of the key a store was created with.
FINGERPRINT_META = "key_fingerprint"
#: Bytes of a fingerprint, and of a MAC.
FINGERPRINT_SIZE = 8
MAC_SIZE = 16
_MAX_KEY_FILE = 1 << 16     # a key file larger than this is not a key


class Signer:
    """What a Store signs records with: a MAC key derived from the user's key, and its
    fingerprint (a keyed hash of nothing: safe to show, names the key, reveals nothing)."""

    __slots__ = ("mac_key", "fingerprint")

    def __init__(self, key: bytes) -> None:
        # BLAKE2b takes keys of up to 64 bytes: any key is first reduced to 32.
        self.mac_key = blake2b(key, digest_size=32, person=b"pstore-key").digest()
        self.fingerprint = blake2b(b"", digest_size=FINGERPRINT_SIZE, key=self.mac_key,
                                           person=b"pstore-fprint").digest()

    @property
    def fingerprint_hex(self) -> str:
        """The fingerprint as 16 hex digits (what ``Store.info()`` and ``pstore info`` show)."""
        return self.fingerprint.hex()


def default_key_path() -> str:
    """Where the per-user key lives when neither ``key=`` nor ``PSTORE_KEY_FILE`` names one."""
    if sys.platform == "win32":
        base = os.environ.get("APPDATA") or os.path.join(os.path.expanduser("~"), "AppData",
                                                         "Roaming")
    elif sys.platform == "darwin":
        base = os.path.join(os.path.expanduser("~"), "Library", "Application Support")
    else:
        base = os.environ.get("XDG_DATA_HOME") or ""
        if not os.path.isabs(base):     # the XDG spec: a relative value is ignored
            base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "pstore", "key")


def signer_for(key: bytes | None) -> Signer:
    """The :class:`Signer` of ``key`` if given, else of the key file (see the module docs)."""
    if key is not None:
        if not isinstance(key, (bytes, bytearray)) or len(key) < MIN_KEY_SIZE:
            raise ArgumentError("key", key if not isinstance(key, (bytes, bytearray))
                                else f"<{len(key)} bytes>", f"bytes, at least {MIN_KEY_SIZE}")
        return Signer(bytes(key))
    named = os.environ.get(KEY_FILE_VARIABLE)
    if named:
        return Signer(read_key_file(named))
    path = default_key_path()
    try:
        return Signer(read_key_file(path))
    except FileNotFoundError:
        return Signer(_create_key_file(path))


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)


def read_key_file(path: str, *, dir_fd: int | None = None) -> bytes:
    """The key in file ``path``, checked (regular file, this user's, 32+ bytes); never
    through a symbolic link. ``FileNotFoundError`` if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _BINARY, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as error:
        # O_NOFOLLOW on a link fails with ELOOP (EMLINK on some BSDs).
        if error.errno in (errno.ELOOP, errno.EMLINK):
            raise KeyFileError(path, "it is a symbolic link") from None
        raise KeyFileError(path, error.strerror or str(error)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(path, "it is not a regular file")
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise KeyFileError(path, f"it belongs to user id {info.st_uid}, not to this user "
                                     f"({os.getuid()})")
        if info.st_size > _MAX_KEY_FILE:
            raise KeyFileError(path, f"it holds {info.st_size} bytes, too many for a key")
        chunks = []
        while True:
            chunk = os.read(fd, _MAX_KEY_FILE + 1)
            if not chunk:
                break
            chunks.append(chunk)
        key = b"".join(chunks)
    finally:
        os.close(fd)
    if len(key) < MIN_KEY_SIZE:
        raise KeyFileError(path, f"it holds {len(key)} bytes; a key has at least "
                                 f"{MIN_KEY_SIZE}")
    return key


def _create_key_file(path: str) -> bytes:
    """Create the per-user key file at ``path`` with 32 random bytes, or read the one another
    process created meanwhile."""
    folder, name = os.path.split(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if os.open not in os.supports_dir_fd or os.link not in os.supports_dir_fd:
        return _create_key_file_by_path(folder, name)
    try:
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC)
    except OSError as error:
        raise KeyFileError(path, f"its folder cannot be opened as a folder of its own, not "
                                 f"a link ({error.strerror})") from None
    try:
        info = os.fstat(dir_fd)
        if info.st_uid != os.getuid():
            raise KeyFileError(path, f"its folder belongs to user id {info.st_uid}")
        temp = f".key-{os.urandom(8).hex()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        key = os.urandom(MIN_KEY_SIZE)
        try:
            try:
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd,
                        follow_symlinks=False)
            except FileExistsError:     # another process won: its key is the key
                return read_key_file(name, dir_fd=dir_fd)
            os.fsync(dir_fd)
        finally:
            os.unlink(temp, dir_fd=dir_fd)
        return key
    finally:
        os.close(dir_fd)


def _create_key_file_by_path(folder: str, name: str) -> bytes:
    """:func:`_create_key_file` where ``dir_fd`` is not supported (Windows)."""
    temp = os.path.join(folder, f".key-{os.urandom(8).hex()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o600)
    key = os.urandom(MIN_KEY_SIZE)
    try:
        try:
            os.write(fd, key)
        finally:
            os.close(fd)
        try:
            os.link(temp, os.path.join(folder, name))
        except FileExistsError:
            return read_key_file(os.path.join(folder, name))
    finally:
        os.unlink(temp)
    return key


def made_with(signer: Signer, backend: ReadableBackend, *, writable: bool) -> bool:
    """Whether the store ``backend`` opens was made with ``signer``'s key (its
    :data:`FINGERPRINT_META`). A writable store that records no fingerprint (a new one,
    or one a pstore that did not sign made) records ``signer``'s, in a transaction."""
    fingerprint = backend.get_meta(FINGERPRINT_META)
    if writable and fingerprint is None:
        with cast("Backend", backend).writing() as writing:     # writable: a Backend
            writing.set_meta(FINGERPRINT_META, signer.fingerprint_hex)
        fingerprint = signer.fingerprint_hex
    return fingerprint == signer.fingerprint_hex
