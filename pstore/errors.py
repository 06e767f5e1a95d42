"""The exceptions pstore raises.

Every error pstore raises itself derives from :class:`Error`, and most also
derive from the built-in exception a user would catch anyway (a missing key is
a ``KeyError``, a lock timeout a ``TimeoutError``). The engine raises the
standard library's ``pickle.PicklingError`` and ``pickle.UnpicklingError`` so
that ``except pickle.UnpicklingError`` keeps working.

Each exception keeps the facts of the failure as attributes (``path``,
``key``, ``object_id``, ``timeout``) in ``args``, so it pickles and unpickles
cleanly, and builds its message from them.
"""

from __future__ import annotations

from pickle import PicklingError, UnpicklingError

__all__ = [
    "Error",
    "ClosedError",
    "ReadOnlyError",
    "LockTimeoutError",
    "FormatError",
    "CorruptionError",
    "IntegrityError",
    "UntrustedError",
    "KeyFileError",
    "MissingObjectError",
    "UnsafeFileError",
    "ConnectionLostError",
    "ServerLockTimeoutError",
    "MissingModuleError",
    "UnstorableError",
    "ReferenceCycleError",
    "ArgumentError",
    "KeyTypeError",
    "PersistentClassError",
    "InTransactionError",
    "StorePicklingError",
    "MissingClassError",
]


class Error(Exception):
    """The root of every exception pstore raises itself."""


class ClosedError(Error, ValueError):
    """The store (or the object it belongs to) was closed; reopen it to use it again."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path

    def __str__(self) -> str:
        return f"store {self.path!r} is closed"


class ReadOnlyError(Error, PermissionError):
    """A write was attempted on a store opened read-only (flag 'r')."""

    def __init__(self, path: str, operation: str) -> None:
        super().__init__(path, operation)
        self.path = path
        self.operation = operation

    def __str__(self) -> str:
        return f"cannot {self.operation}: store {self.path!r} was opened read-only"


class LockTimeoutError(Error, TimeoutError):
    """Another process held the store's lock for longer than ``lock_timeout``."""

    def __init__(self, path: str, timeout: float, holder: str | None = None) -> None:
        """``holder``: who holds the lock (pid, host, program, since when), as the holder
        wrote it into the lock file; None if it wrote nothing readable."""
        super().__init__(path, timeout, holder)
        self.path = path
        self.timeout = timeout
        self.holder = holder

    def __str__(self) -> str:
        who = "another process" if self.holder is None else self.holder
        return (f"could not lock store {self.path!r}: {who} held the lock "
                f"for the whole {self.timeout:g} s the lock_timeout allows")


class FormatError(Error, ValueError):
    """The file is not a pstore store, or is one of a format version this pstore cannot read.

    Only that: damage inside a store pstore can read raises :class:`CorruptionError`.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path!r} is not a usable pstore store: {self.reason}"


def _place(key: str | None, object_id: int | None) -> str:
    """`` (key 'k', object id 3)``: which value an error hit, as its message says it ("" if
    neither is known)."""
    where = ([f"key {key!r}"] if key is not None else []) + \
        ([f"object id {object_id}"] if object_id is not None else [])
    return f" ({', '.join(where)})" if where else ""


class CorruptionError(Error, ValueError):
    """Stored bytes are damaged: a record whose digest does not match, a malformed
    database page, an undecodable payload, a blob that is not what its record says.

    ``what`` says what was found; ``key`` and ``object_id`` (either may be None)
    say which value it hit. The exception that revealed the damage, if any, is the
    ``__cause__``. The store itself is left as it was.
    """

    def __init__(self, path: str, what: str, *, key: str | None = None,
                 object_id: int | None = None) -> None:
        super().__init__(path, what, key, object_id)
        self.path = path
        self.what = what
        self.key = key
        self.object_id = object_id

    def __reduce__(self) -> tuple[object, ...]:
        # The keyword-only arguments are not positional in args: rebuild through a helper.
        return _corruption_error, self.args, self.__dict__

    def __str__(self) -> str:
        place = _place(self.key, self.object_id)
        return f"store {self.path!r} is damaged{place}: {self.what}"


def _corruption_error(path: str, what: str, key: str | None,
                      object_id: int | None) -> CorruptionError:
    return CorruptionError(path, what, key=key, object_id=object_id)


class IntegrityError(CorruptionError):
    """A record's bytes are not what was written: its digest, or its MAC under the Store's
    signing key, does not match (damaged, or edited by someone without the key). Raised
    instead of loading it; names ``path``, ``key`` and ``object_id`` as
    :class:`CorruptionError` does."""

    def __reduce__(self) -> tuple[object, ...]:
        return _integrity_error, self.args, self.__dict__


def _integrity_error(path: str, what: str, key: str | None,
                     object_id: int | None) -> IntegrityError:
    return IntegrityError(path, what, key=key, object_id=object_id)


class UntrustedError(Error, UnpicklingError):
    """Restricted loading refused a record that is not signed by the Store's key.

    ``global_name`` is the ``module.name`` refused (None when the refusal was not of a
    global: a call, a BUILD, the load budget); ``reason`` the restricted unpickler's
    words; ``key`` and ``object_id`` say which value. Nothing the record names was run;
    it is never retried unrestricted. To load it: ``pstore.open(..., allow=[...])`` for
    the names you trust, or review ``Store.globals(key)`` and ``Store.trust([key])``.
    """

    def __init__(self, path: str, reason: str, *, key: str | None = None,
                 object_id: int | None = None, global_name: str | None = None) -> None:
        super().__init__(path, reason, key, object_id, global_name)
        self.path = path
        self.reason = reason
        self.key = key
        self.object_id = object_id
        self.global_name = global_name

    def __reduce__(self) -> tuple[object, ...]:
        return _untrusted_error, self.args, self.__dict__

    def __str__(self) -> str:
        place = _place(self.key, self.object_id)
        how = ("pass allow=[" + repr(self.global_name) + "] to pstore.open if you trust "
               "the code it names" if self.global_name else "pass allow= to pstore.open for "
               "the names you trust")
        return (f"store {self.path!r}{place}: the record is not signed by this store's key, "
                f"so it was loaded restricted, which refused it: {self.reason}; to load it, "
                f"{how}, or review `pstore globals` and trust it (Store.trust, `pstore trust`)")


def _untrusted_error(path: str, reason: str, key: str | None, object_id: int | None,
                     global_name: str | None) -> UntrustedError:
    return UntrustedError(path, reason, key=key, object_id=object_id, global_name=global_name)


class KeyFileError(Error, PermissionError):
    """The signing key file at ``path`` cannot be used: ``reason`` says why (not a regular
    file, a symbolic link, owned by another user, shorter than 32 bytes, unreadable).
    Nothing was read or written through it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"refusing to use signing key file {self.path!r}: {self.reason}"


class MissingObjectError(Error, KeyError):
    """A reference, or a placeholder of a Persistent object, names an object id that has
    no record (it was removed). ``what`` says what needed the record, when known."""

    def __init__(self, path: str, object_id: int, what: str | None = None) -> None:
        super().__init__(path, object_id, what)
        self.path = path
        self.object_id = object_id
        self.what = what

    def __str__(self) -> str:
        message = f"store {self.path!r} has no record with object id {self.object_id}"
        return message if self.what is None else f"{message}: {self.what}"


class UnstorableError(Error, PicklingError):
    """A value cannot be stored: ``what`` names it (its key, or its object id), ``reason``
    says why. The transaction it was part of was rolled back."""

    def __init__(self, path: str, what: str, reason: str) -> None:
        super().__init__(path, what, reason)
        self.path = path
        self.what = what
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot store {self.what} in store {self.path!r}: {self.reason}"


class ReferenceCycleError(UnstorableError):
    """The store refused a value that refers, through other stored plain objects, back to
    itself: pstore cannot load such a cycle of records."""

    REASON = ("it refers (through other stored objects) back to itself, and pstore cannot "
              "load a cycle of records; store the objects of the cycle under one key, or "
              "make one of them a pstore.Persistent object")

    def __init__(self, path: str, what: str) -> None:
        Error.__init__(self, path, what)
        self.path = path
        self.what = what
        self.reason = self.REASON


class ArgumentError(Error, ValueError):
    """An argument has a value pstore does not accept: ``name`` must be ``expected``."""

    def __init__(self, name: str, value: object, expected: str) -> None:
        super().__init__(name, value, expected)
        self.name = name
        self.value = value
        self.expected = expected

    def __str__(self) -> str:
        return f"{self.name} must be {self.expected}, not {self.value!r}"


class KeyTypeError(Error, TypeError):
    """A key that is not a ``str``; ``key_type`` names its type."""

    def __init__(self, key_type: str) -> None:
        super().__init__(key_type)
        self.key_type = key_type

    def __str__(self) -> str:
        return f"pstore keys must be str, not {self.key_type}"


class PersistentClassError(Error, TypeError):
    """A subclass of :class:`~pstore.Persistent` that pstore cannot store (raised when
    the class is defined): ``class_name`` and the ``reason``."""

    def __init__(self, class_name: str, reason: str) -> None:
        super().__init__(class_name, reason)
        self.class_name = class_name
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.class_name}: {self.reason}"


class InTransactionError(Error, RuntimeError):
    """``operation`` cannot run inside a ``scope`` (a transaction, or a snapshot: which
    reads only) of the store at ``path``."""

    def __init__(self, path: str, operation: str, scope: str = "transaction") -> None:
        super().__init__(path, operation, scope)
        self.path = path
        self.operation = operation
        self.scope = scope

    def __str__(self) -> str:
        return f"cannot {self.operation} inside a {self.scope} of store {self.path!r}"


class StorePicklingError(Error, TypeError):
    """A Store cannot be pickled (sent to another process) now: ``reason`` says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot pickle store {self.path!r}: {self.reason}"


class UnsafeFileError(Error, PermissionError):
    """A file beside the store (lock, counter, journal) is not what pstore made: a symbolic
    link, not a regular file, owned by another user than the store, or not accessible.
    pstore uses no such file and changes nothing through it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"refusing to use {self.path!r}: {self.reason}"


class ConnectionLostError(Error, ConnectionError):
    """The connection to the store's database server failed or was lost; ``reason`` is the
    server's or the client library's word for it (never with a password). The next call
    connects again; a transaction under way was rolled back by the server."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"lost the connection to the server of store {self.path!r}: {self.reason}"


class ServerLockTimeoutError(LockTimeoutError):
    """A :class:`LockTimeoutError` on a database server, naming the session that held the
    lock: its server process id ``pid``, ``application_name`` and client ``address``."""

    def __init__(self, path: str, timeout: float, pid: int, application_name: str,
                 address: str) -> None:
        super().__init__(path, timeout)
        self.args = (path, timeout, pid, application_name, address)
        self.pid = pid
        self.application_name = application_name
        self.address = address

    def __str__(self) -> str:
        return (f"{super().__str__()} (held by server process {self.pid}, application "
                f"{self.application_name!r}, client {self.address})")


class MissingClassError(Error, AttributeError):
    """A record names a global (its class, mostly) that cannot be imported any more: its
    module or the name in it is gone (renamed or removed).

    ``global_name`` is ``module.name`` as the record names it; ``renamed_to`` the name
    ``renames=`` mapped it to, if it did; ``reason`` what the import said. ``key`` and
    ``object_id`` (either may be None) say which value it hit. An ``AttributeError``, as a
    missing name always was; map the old name to the new one with
    ``pstore.open(..., renames={"old.module.Name": "new.module.Name"})``.
    """

    def __init__(self, path: str, global_name: str, reason: str, *,
                 renamed_to: str | None = None, key: str | None = None,
                 object_id: int | None = None) -> None:
        super().__init__(path, global_name, reason, renamed_to, key, object_id)
        self.path = path
        self.global_name = global_name
        self.reason = reason
        self.renamed_to = renamed_to
        self.key = key
        self.object_id = object_id

    def __reduce__(self) -> tuple[object, ...]:
        # The keyword-only arguments are not positional in args: rebuild through a helper.
        return _missing_class_error, self.args, self.__dict__

    def __str__(self) -> str:
        place = _place(self.key, self.object_id)
        name = self.global_name if self.renamed_to is None else \
            f"{self.global_name} (renamed to {self.renamed_to})"
        return (f"store {self.path!r} cannot load a record{place}: it names {name}, which "
                f"cannot be imported ({self.reason}); if it was renamed, open the store "
                f"with renames={{{self.global_name!r}: 'its.new.Name'}}")


def _missing_class_error(path: str, global_name: str, reason: str, renamed_to: str | None,
                         key: str | None, object_id: int | None) -> MissingClassError:
    return MissingClassError(path, global_name, reason, renamed_to=renamed_to, key=key,
                             object_id=object_id)


class MissingModuleError(Error, ModuleNotFoundError):
    """An optional module is not installed that ``feature`` needs; ``install`` says how to
    get it. Nothing stored is wrong: the same store reads where the module is."""

    def __init__(self, module: str, feature: str, install: str) -> None:
        super().__init__(module, feature, install)
        self.name = module      # ModuleNotFoundError's attribute
        self.feature = feature
        self.install = install

    def __str__(self) -> str:
        return f"{self.feature} needs the {self.name} module: {self.install}"
