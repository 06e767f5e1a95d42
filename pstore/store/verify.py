"""Damage: what loading makes of an error, and the walk behind :meth:`pstore.Store.verify`.

:func:`load_error` is the one place the store's load path translates errors:
damaged bytes become :class:`~pstore.errors.CorruptionError` naming the path and
the key or object id (the original error as ``__cause__``), an error of the
user's code while loading a record whose digest verified keeps its type and gets
a note naming the object id and key. :func:`verify` reads every record, key
binding, reference and blob without unpickling anything.
"""

from __future__ import annotations

import pickle
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from ..errors import (
    CorruptionError,
    Error,
    FormatError,
    MissingClassError,
    MissingModuleError,
    MissingObjectError,
    UntrustedError,
)
from . import blobio, records

if TYPE_CHECKING:
    from ..backends import ReadableBackend
    from .signing import Signer

__all__ = ["Problem", "VerifyReport", "load_error", "verify"]

_NOTE = "pstore: raised while loading object id "
# What unpickling garbage raises. Only for records without a digest (format version 2)
# do these mean damage; other errors there, and every error of a verified record, are
# the user's code's (a missing class, a __setstate__).
_GARBAGE = (pickle.UnpicklingError, UnicodeDecodeError, EOFError, OverflowError, MemoryError,
            IndexError, struct.error)


def _add_note(error: BaseException, note: str) -> None:
    if sys.version_info >= (3, 11):
        error.add_note(note)
    else:   # kept where 3.11 keeps it; 3.10's traceback does not print it
        error.__notes__ = [*getattr(error, "__notes__", ()), note]  # type: ignore[attr-defined]


def load_error(error: Exception, path: str, *, is_damage: Callable[[Exception], bool],
               key: str | None = None, object_id: int | None = None,
               decoded: bool | None = None) -> Exception:
    """The exception to raise for ``error``, met while loading from store ``path``.

    ``decoded``: None while stored bytes are read and checked (for key ``key``,
    or record ``object_id``): an error ``is_damage`` (the backend's) calls damage
    becomes :class:`CorruptionError`. True or False while record ``object_id``'s
    payload is unpickled, after its digest verified (True) or with no digest to
    check (False, format version 2): the error keeps its type and gets a note,
    unless it is one garbage raises in an unverified payload. Errors already
    translated by a nested load pass; called again with ``key``, a
    ``CorruptionError`` gains the key and a note names it too. A
    :class:`~pstore.errors.MissingClassError` gains the key and object id it lacks.
    """
    if isinstance(error, CorruptionError):     # IntegrityError too: the type is kept
        if (key is None or error.key is not None) and \
                (object_id is None or error.object_id is not None):
            return error
        named = type(error)(error.path, error.what, key=error.key if key is None else key,
                            object_id=object_id if error.object_id is None
                            else error.object_id)
        named.__cause__ = error.__cause__
        return named
    if isinstance(error, MissingClassError):
        # The innermost record naming the class keeps its object id; the key is added.
        if (error.key is not None or key is None) and \
                (error.object_id is not None or object_id is None):
            return error
        found = MissingClassError(
            error.path, error.global_name, error.reason, renamed_to=error.renamed_to,
            key=error.key if error.key is not None else key,
            object_id=error.object_id if error.object_id is not None else object_id)
        found.__cause__ = error.__cause__
        return found
    if isinstance(error, UntrustedError):
        if key is None or error.key is not None:
            return error
        return UntrustedError(error.path, error.reason, key=key, object_id=error.object_id,
                              global_name=error.global_name)
    notes = getattr(error, "__notes__", None)
    noted = notes is not None and any(str(note).startswith(_NOTE) for note in notes)
    if noted:
        if key is not None and notes is not None:
            for index, note in enumerate(notes):
                if str(note).startswith(_NOTE) and "for key" not in note:
                    notes[index] = f"{note}, for key {key!r}"
        return error
    if key is not None and isinstance(error, MissingObjectError) and error.what is None:
        # Every id a key binds, or a committed record refers to, has a record (the
        # placeholder of a Persistent object is another matter: its `what` says so).
        corruption = CorruptionError(path, f"it refers to object id {error.object_id}, which "
                                     f"has no record", key=key, object_id=error.object_id)
        corruption.__cause__ = error
        return corruption
    if (isinstance(error, Error) and not isinstance(error, MissingModuleError)
            and not (decoded is None and is_damage(error))):
        return error    # pstore's own (a missing object, a closed store, ...); a missing
                        # module gets the note naming the record, below
    if decoded is None:
        damaged = is_damage(error)
        # A FormatError here is a blob's (missing, or of the wrong size): its reason says it.
        what = (error.reason if isinstance(error, FormatError)
                else f"its bytes cannot be read ({type(error).__name__}: {error})")
    else:
        damaged = not decoded and isinstance(error, _GARBAGE)
        what = (f"its record, which has no digest (format version 2), does not unpickle "
                f"({type(error).__name__}: {error})")
    if damaged:
        corruption = CorruptionError(path, what, key=key, object_id=object_id)
        corruption.__cause__ = error
        return corruption
    if object_id is not None:
        place = f"{_NOTE}{object_id} of store {path!r}"
        _add_note(error, place if key is None else f"{place}, for key {key!r}")
    return error


class Problem(NamedTuple):
    """One thing :func:`verify` found wrong; the fields that apply are set."""

    what: str
    key: str | None = None
    object_id: int | None = None
    blob: str | None = None

    def __str__(self) -> str:
        where = [f"key {self.key!r}" if self.key is not None else "",
                 f"object id {self.object_id}" if self.object_id is not None else "",
                 f"blob {self.blob}" if self.blob is not None else ""]
        place = ", ".join(part for part in where if part)
        return f"{place}: {self.what}" if place else self.what


class VerifyReport:
    """What :meth:`pstore.Store.verify` found.

    ``ok`` is True when ``problems`` is empty. The counts say how much was
    checked: records (``unverified`` of them have no digest: written before
    format version 3; ``signed`` of them verified by a MAC under the Store's key, the
    others load restricted), keys and distinct blobs.
    """

    # A plain class, not a dataclass: importing dataclasses (and inspect) would cost
    # every ``import pstore`` several milliseconds.
    def __init__(self, path: str, problems: list[Problem] | None = None, records: int = 0,
                 unverified: int = 0, keys: int = 0, blobs: int = 0, signed: int = 0) -> None:
        self.path = path
        self.problems: list[Problem] = [] if problems is None else problems
        self.records = records
        self.unverified = unverified
        self.keys = keys
        self.blobs = blobs
        self.signed = signed

    def __repr__(self) -> str:
        return (f"VerifyReport(path={self.path!r}, problems={self.problems!r}, "
                f"records={self.records}, unverified={self.unverified}, keys={self.keys}, "
                f"blobs={self.blobs}, signed={self.signed})")

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = (f"{self.path}: {self.records} records ({self.unverified} without digest, "
                f"{self.signed} signed by this key), "
                f"{self.keys} keys, {self.blobs} blobs: "
                f"{'ok' if self.ok else f'{len(self.problems)} problems'}")
        return "\n".join([head, *(f"  {problem}" for problem in self.problems)])


def _check_blob(backend: ReadableBackend, blob: records.BlobRef) -> str | None:
    """What is wrong with ``blob``'s file (its digest re-computed), or None."""
    # Imported here: the store layer names no backend module but for this check.
    from ..blob_names import blob_digest, naming_of
    try:
        if blob.codec:
            content = bytearray()
            for chunk in backend.read_blob(blob.name):
                content += chunk
            blobio.read_blob(backend, blob, writable=False)     # decompresses as declared
        else:
            content = backend.get_blob(blob.name, blob.size, writable=False)
        if blob_digest(content, naming_of(blob.name)) != blob.name:
            return "its file's bytes do not match its name (digest)"
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def verify(backend: ReadableBackend, *, max_record_size: int,
           signer: Signer | None = None) -> VerifyReport:
    """Check every record's digest (its MAC, for those ``signer`` signed), every reference's
    target, every key binding and every blob's contents of ``backend``'s store; unpickle
    nothing. Read-only."""
    report = VerifyReport(backend.path)
    problems = report.problems
    oids: set[int] = set()
    refs_of: dict[int, list[int]] = {}
    blobs: dict[str, tuple[records.BlobRef, int]] = {}
    damaged: dict[int, int] = {}    # object id of a damaged record -> its problem's index
    last = None
    try:
        for oid, data, refs in backend.iter_records():
            last = oid
            report.records += 1
            oids.add(oid)
            refs_of[oid] = refs
            try:
                unpacked = records.unpack(data, oid, signer=signer,
                                          digest_required=oid >= backend.digests_from,
                                          max_size=max_record_size)
            except ValueError as error:
                damaged[oid] = len(problems)
                problems.append(Problem(str(error), object_id=oid))
                continue
            report.unverified += not unpacked.verified
            report.signed += unpacked.signed
            for blob in unpacked.blobs:
                blobs.setdefault(blob.name, (blob, oid))
    except Exception as error:
        after = "" if last is None else f" after object id {last}"
        problems.append(Problem(f"the records cannot be read{after} "
                                f"({type(error).__name__}: {error})"))
    for oid, refs in refs_of.items():
        for ref in refs:
            if ref not in oids:
                problems.append(Problem(f"it refers to object id {ref}, which has no record",
                                        object_id=oid))
    try:
        for key in backend.iter_keys():
            report.keys += 1
            try:
                bound = backend.get_key(key)
            except CorruptionError as error:
                problems.append(Problem(error.what, key=key, object_id=error.object_id))
                continue
            if bound in damaged and problems[damaged[bound]].key is None:
                # The damaged record is this key's value: say so (the first key naming it).
                problems[damaged[bound]] = problems[damaged[bound]]._replace(key=key)
            if bound is not None and bound not in oids:
                problems.append(Problem(str(MissingObjectError(backend.path, bound)), key=key,
                                        object_id=bound))
    except CorruptionError as error:     # the listing itself met a damaged binding
        problems.append(Problem(f"{error.what} (the keys after it were not checked)",
                                key=error.key, object_id=error.object_id))
    except Exception as error:
        problems.append(Problem(f"the keys cannot be read after {report.keys} "
                                f"({type(error).__name__}: {error})"))
    for name, (blob, oid) in blobs.items():
        report.blobs += 1
        found = _check_blob(backend, blob)
        if found is not None:
            problems.append(Problem(found, object_id=oid, blob=name))
    problems.extend(Problem(problem) for problem in backend.problems())
    return report
