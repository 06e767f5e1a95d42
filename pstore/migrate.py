"""Copying data written by other tools into a pstore store, and stores between backends.

:func:`copy` copies a pstore store into an empty one of any backend, record by record,
unpickling nothing (docs/servers.md, "Move the data").

:func:`convert` reads a ``shelve`` file, a ``sqlitedict`` file, a ``diskcache``
directory or a ZODB ``FileStorage`` and writes its keys and values into a store.
Every source is read without changing it, and every value is unpickled by
pstore's engine, never by the standard library's ``pickle`` (nor ZODB's). See
docs/migrating.md.

Keys: pstore keys are ``str``. A source key of another type (diskcache's tuples
and ints, bytes, a ZODB root's tuple keys) is refused by default -- before anything
is written, with a list of them -- or, with ``keys="repr"``, stored under
``repr(key)`` (``('user', 1)`` becomes ``"('user', 1)"``; ``ast.literal_eval`` gives
the key back for literals). A ``repr`` that equals another source key is refused.
"""

from __future__ import annotations

import builtins
import io
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from . import engine
from .backends import Backend, ReadableBackend, detect_backend, open_backend
from .errors import CorruptionError, Error
from .store import DEFAULT_LOCK_TIMEOUT, open, records

__all__ = ["convert", "convert_shelve", "copy", "detect_kind", "ConvertError", "ConvertReport",
           "CopyError", "KINDS"]

#: The kinds of source :func:`convert` reads.
KINDS = ("shelve", "sqlitedict", "diskcache", "zodb")

#: The key under which a diskcache conversion stores {key: expire_time} of the entries
#: that had an expiry time (pstore has no expiry of its own).
DISKCACHE_EXPIRY_KEY = "diskcache:expire_time"


class ConvertError(Error, ValueError):
    """A source cannot be converted as asked: its kind is unknown, it is damaged, or
    some of its keys are not ``str`` (``keys="repr"`` maps them)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot convert {self.path!r}: {self.reason}"


@dataclass
class ConvertReport:
    """What :func:`convert` did: ``copied`` keys, ``expired`` diskcache entries left out
    (they were already gone for diskcache), and notes a user should read."""

    kind: str
    copied: int = 0
    expired: int = 0
    notes: list[str] = field(default_factory=list)


def detect_kind(source: str | os.PathLike[str]) -> str:
    """The kind of ``source`` (one of :data:`KINDS`), told from its files; else ConvertError."""
    path = os.fsdecode(os.fspath(source))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "cache.db")):
            return "diskcache"
        raise ConvertError(path, "a folder without diskcache's cache.db")
    if os.path.isfile(path):
        with builtins.open(path, "rb") as file:
            head = file.read(16)
        if head[:4] in (b"FS21", b"FS30"):     # FileStorage's magic, Python 2 and 3
            return "zodb"
        if head.startswith(b"SQLite format 3\0"):
            if _sqlitedict_tables(path):
                return "sqlitedict"
            raise ConvertError(path, "an SQLite database without sqlitedict's tables "
                                     "(key TEXT PRIMARY KEY, value BLOB)")
    import dbm

    if dbm.whichdb(path):
        return "shelve"
    raise ConvertError(path, f"not a source pstore can convert ({', '.join(KINDS)})")


def convert(source: str | os.PathLike[str], target: str | os.PathLike[str], *,
            kind: str | None = None, keys: str = "refuse", table: str | None = None,
            backend: str | None = None, flag: str = "c", batch: int = 1000,
            lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
            progress: Callable[[int], None] | None = None) -> ConvertReport:
    """Copy every key of ``source`` into the store ``target``; return a :class:`ConvertReport`.

    ``kind``: one of :data:`KINDS`, or None to tell it from the source's files.
    ``keys``: ``"refuse"`` (default) or ``"repr"``, for source keys that are not
    ``str`` (see the module's docstring). ``table``: for sqlitedict, the one table
    to copy; by default every table, keys prefixed ``"TABLE/"`` when the file has
    more than one. ``target`` is opened with ``backend`` and ``flag`` as by
    :func:`pstore.open` (``backend=None``: that of the store already there, else
    SQLite). Keys are written ``batch`` at a time, each batch one
    transaction: if the copy fails, the batches before the failure are in ``target``,
    and running it again completes it. ``progress(n)`` is called after each batch
    with the number of keys copied in it.

    diskcache: expired entries are left out; the expiry times of the others are
    stored under :data:`DISKCACHE_EXPIRY_KEY` as ``{key: unix time}``; tags and access
    statistics are not kept. ZODB: the root mapping's items are copied;
    ``PersistentMapping``/``PersistentList`` become ``pstore.PersistentDict``/
    ``PersistentList``, BTrees become dicts (TreeSets sets), and objects of other
    persistent classes become ordinary objects of their class (its module must be
    importable), loaded with their state. Objects shared through ZODB references stay
    shared within one key's value, and across keys where they become pstore
    Persistent objects (PersistentMapping/List); other objects shared between two
    root keys become one copy per key. ZODB blobs are refused (``ConvertError``).
    """
    path = os.fsdecode(os.fspath(source))
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    if keys not in ("refuse", "repr"):
        raise ValueError(f"keys must be 'refuse' or 'repr', not {keys!r}")
    kind = detect_kind(path) if kind is None else kind
    if kind not in _SOURCES:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    report = ConvertReport(kind)
    with _SOURCES[kind](path, table, report) as items:
        named = _check_keys(path, items, keys)
        with open(target, flag, backend=backend, lock_timeout=lock_timeout) as store:
            pairs = ((named[key], value) for key, value in items.items())
            while chunk := list(islice(pairs, batch)):
                store.update(chunk)
                report.copied += len(chunk)
                if progress is not None:
                    progress(len(chunk))
            if items.expiry:
                store[DISKCACHE_EXPIRY_KEY] = {named[key]: when
                                               for key, when in items.expiry.items()}
                report.notes.append(f"the expiry times of {len(items.expiry)} entries are "
                                    f"stored under the key {DISKCACHE_EXPIRY_KEY!r}")
    return report


def convert_shelve(source: str | os.PathLike[str], target: str | os.PathLike[str], *,
                   backend: str | None = None, flag: str = "c", batch: int = 1000,
                   lock_timeout: float = DEFAULT_LOCK_TIMEOUT) -> int:
    """Copy every key of the ``shelve`` file ``source`` into the store ``target``; return
    how many: :func:`convert` with ``kind="shelve"``."""
    return convert(source, target, kind="shelve", backend=backend, flag=flag, batch=batch,
                   lock_timeout=lock_timeout).copied


def _check_keys(path: str, items: _Source, rule: str) -> dict[Any, str]:
    """{source key: target key}, or ConvertError listing the keys the rule refuses."""
    named: dict[Any, str] = {}
    others = []
    for key in items.keys():
        if type(key) is str:
            named[key] = key
        else:
            others.append(key)
    if others and rule == "refuse":
        shown = ", ".join(repr(key) for key in others[:10])
        more = f" and {len(others) - 10} more" if len(others) > 10 else ""
        raise ConvertError(path, f"{len(others)} keys are not str: {shown}{more}; "
                                 f"keys='repr' (pstore convert --keys repr) stores each "
                                 f"under repr(key)")
    clashes = [key for key in others if repr(key) in named]
    if clashes:
        raise ConvertError(path, f"repr() of {len(clashes)} keys equals another key: "
                                 f"{', '.join(repr(key) for key in clashes[:10])}")
    named.update((key, repr(key)) for key in others)
    return named


# -- sources -------------------------------------------------------------------------------

class _Source:
    """One open source: keys() and items() may each be iterated once or more."""

    def __init__(self) -> None:
        self.expiry: dict[Any, float] = {}

    def keys(self) -> Iterable[Any]:
        raise NotImplementedError

    def items(self) -> Iterator[tuple[Any, Any]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ShelveSource(_Source):
    def __init__(self, path: str, table: str | None, report: ConvertReport) -> None:
        super().__init__()
        self._shelf = open(path, "r", backend="shelve")

    def keys(self) -> Iterable[Any]:
        return list(self._shelf)

    def items(self) -> Iterator[tuple[Any, Any]]:
        return iter(self._shelf.items())

    def close(self) -> None:
        self._shelf.close()


def _connect_read_only(path: str) -> sqlite3.Connection:
    from urllib.parse import quote

    return sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)


def _sqlitedict_tables(path: str) -> list[str]:
    """The tables of an SQLite file that have sqlitedict's two columns."""
    try:
        with _connect_read_only(path) as db:
            tables = [name for (name,) in
                      db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return [name for name in tables
                    if [(row[1], row[2].upper()) for row in
                        db.execute("SELECT * FROM pragma_table_info(?)", (name,))]
                    == [("key", "TEXT"), ("value", "BLOB")]]
    except sqlite3.DatabaseError:
        return []


class _SqliteDictSource(_Source):
    def __init__(self, path: str, table: str | None, report: ConvertReport) -> None:
        super().__init__()
        self._path = path
        tables = _sqlitedict_tables(path)
        if table is not None:
            if table not in tables:
                raise ConvertError(path, f"no sqlitedict table {table!r} (it has: "
                                         f"{', '.join(tables) or 'none'})")
            tables = [table]
        self._tables = tables
        self._db = _connect_read_only(path)

    def _rows(self, columns: str) -> Iterator[tuple[str, tuple[Any, ...]]]:
        for name in self._tables:
            quoted = '"' + name.replace('"', '""') + '"'
            for row in self._db.execute(f"SELECT {columns} FROM {quoted} ORDER BY rowid"):
                yield name, row

    def _name(self, table: str, key: Any) -> Any:
        if len(self._tables) > 1:
            return f"{table}/{key}"
        return key

    def keys(self) -> Iterable[Any]:
        return [self._name(table, key) for table, (key,) in self._rows("key")]

    def items(self) -> Iterator[tuple[Any, Any]]:
        for table, (key, value) in self._rows("key, value"):
            name = self._name(table, key)
            yield name, _loads(self._path, value, f"the value of key {name!r}")

    def close(self) -> None:
        self._db.close()


def _loads(path: str, data: Any, what: str) -> Any:
    if not isinstance(data, bytes):
        raise ConvertError(path, f"{what} is not a pickle (an SQLite {type(data).__name__})")
    try:
        return engine.loads(data)
    except engine.UnpicklingError as error:
        raise ConvertError(path, f"{what} is not a readable pickle: {error}") from error


# diskcache's modes of storing a value (its Disk class documents them).
_RAW, _BINARY, _TEXT, _PICKLE = 1, 2, 3, 4


class _DiskCacheSource(_Source):
    def __init__(self, path: str, table: str | None, report: ConvertReport) -> None:
        super().__init__()
        self._path = path
        self._report = report
        self._db = _connect_read_only(os.path.join(path, "cache.db"))
        self._now = time.time()
        try:
            self._db.execute("SELECT key, raw, expire_time, mode, filename, value "
                             "FROM Cache LIMIT 0")
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise ConvertError(path, f"not a diskcache cache.db ({error})") from error

    def _rows(self) -> Iterator[tuple[Any, ...]]:
        for row in self._db.execute("SELECT key, raw, expire_time, mode, filename, value "
                                    "FROM Cache ORDER BY rowid"):
            if row[2] is not None and row[2] <= self._now:
                continue
            yield row

    def _key(self, key: Any, raw: int) -> Any:
        if raw:
            return key
        return _loads(self._path, key, "a pickled key")

    def keys(self) -> Iterable[Any]:
        return [self._key(row[0], row[1]) for row in self._rows()]

    def items(self) -> Iterator[tuple[Any, Any]]:
        self._report.expired = self._db.execute(
            "SELECT COUNT(*) FROM Cache WHERE expire_time <= ?", (self._now,)).fetchone()[0]
        for key, raw, expire_time, mode, filename, value in self._rows():
            key = self._key(key, raw)
            if expire_time is not None:
                self.expiry[key] = expire_time
            yield key, self._value(key, mode, filename, value)

    def _value(self, key: Any, mode: int, filename: str | None, value: Any) -> Any:
        if mode == _RAW:
            return value
        if mode == _PICKLE and value is not None:
            return _loads(self._path, value, f"the value of key {key!r}")
        if mode not in (_BINARY, _TEXT, _PICKLE) or not filename:
            raise ConvertError(self._path, f"the value of key {key!r} has an unknown "
                                           f"storage mode {mode!r}")
        data = self._read_value_file(key, filename)
        if mode == _BINARY:
            return data
        if mode == _TEXT:
            return data.decode("utf-8")
        return _loads(self._path, data, f"the value of key {key!r} ({filename})")

    def _read_value_file(self, key: Any, filename: str) -> bytes:
        """A value file of the cache folder, never one outside it or behind a link."""
        parts = filename.split("/")
        if (os.path.isabs(filename) or any(part in ("", ".", "..") for part in parts)):
            raise ConvertError(self._path, f"the value of key {key!r} names the file "
                                           f"{filename!r}, which is not inside the cache")
        fd = os.open(self._path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = inner
            file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as error:
            raise ConvertError(self._path, f"cannot read the value file {filename!r} of key "
                                           f"{key!r}: {error.strerror}") from error
        finally:
            os.close(fd)
        with builtins.open(file_fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise ConvertError(self._path, f"the value file {filename!r} of key {key!r} "
                                               f"is not a regular file")
            return file.read()

    def close(self) -> None:
        self._db.close()


class _ZODBSource(_Source):
    """The root mapping of a ZODB FileStorage, its records read raw through ZODB's
    FileStorage and unpickled by pstore's engine; ZODB's own classes (persistent,
    BTrees) are never imported, only recognised by name."""

    def __init__(self, path: str, table: str | None, report: ConvertReport) -> None:
        super().__init__()
        try:
            from ZODB.FileStorage import FileStorage
        except ImportError as error:
            raise ConvertError(path, "reading a ZODB FileStorage needs the ZODB package "
                                     "(pip install ZODB)") from error
        self._path = path
        self._storage = FileStorage(path, read_only=True)
        self._converted: dict[bytes, Any] = {}
        self._root: dict[Any, Any] | None = None

    def close(self) -> None:
        self._storage.close()

    def _root_items(self) -> dict[Any, Any]:
        if self._root is None:
            root = self._object(b"\0" * 8)
            self._root = dict(root)
        return self._root

    def keys(self) -> Iterable[Any]:
        return list(self._root_items())

    def items(self) -> Iterator[tuple[Any, Any]]:
        return iter(self._root_items().items())

    def _record(self, oid: bytes) -> tuple[Any, Any]:
        """(class, state) of the record ``oid``, its references as _Ref."""
        try:
            data, _ = self._storage.load(oid)
        except Exception as error:  # ZODB raises its own POSKeyError and storage errors
            raise ConvertError(self._path, f"cannot read the record of oid "
                                           f"{int.from_bytes(oid, 'big')}: {error}") from error
        unpickler = _ZODBUnpickler(io.BytesIO(data), self._path)
        try:
            meta = unpickler.load()
            state = unpickler.load()
        except engine.UnpicklingError as error:
            raise ConvertError(self._path, f"the record of oid {int.from_bytes(oid, 'big')} "
                                           f"is not two pickles: {error}") from error
        cls = meta[0] if isinstance(meta, tuple) else meta
        return cls, state

    def _object(self, oid: bytes) -> Any:
        if oid in self._converted:
            return self._converted[oid]
        cls, state = self._record(oid)
        if isinstance(cls, _Global) and cls.module.startswith("ZODB.blob"):
            raise ConvertError(self._path, f"the record of oid {int.from_bytes(oid, 'big')} is "
                                           f"a ZODB blob, which pstore does not convert: copy "
                                           f"its file's bytes into an array or bytes first")
        if isinstance(cls, _Global) and cls.module.startswith("persistent."):
            obj = self._persistent_container(oid, cls, state)
        elif isinstance(cls, _Global):
            obj = self._btree(oid, cls, state)
        else:   # a persistent class of the application's
            obj = self._converted[oid] = cls.__new__(cls)
            resolved = self._resolve(state)
            if hasattr(obj, "__setstate__"):
                obj.__setstate__(resolved)
            else:
                obj.__dict__.update(resolved)
        return obj

    def _persistent_container(self, oid: bytes, cls: _Global, state: Any) -> Any:
        from .store.persistent import PersistentDict, PersistentList

        obj: Any
        if (cls.module, cls.name) == ("persistent.mapping", "PersistentMapping"):
            obj = self._converted[oid] = PersistentDict()
            obj.update(self._resolve(_mapping_data(state)))
        elif (cls.module, cls.name) == ("persistent.list", "PersistentList"):
            obj = self._converted[oid] = PersistentList()
            obj.extend(self._resolve(_mapping_data(state)))
        else:
            raise ConvertError(self._path, f"the record of oid {int.from_bytes(oid, 'big')} "
                                           f"is a {cls.module}.{cls.name}, which pstore "
                                           f"does not convert")
        return obj

    def _btree(self, oid: bytes, cls: _Global, state: Any) -> Any:
        name = cls.name
        if not name.endswith(("BTree", "TreeSet", "Bucket", "Set")):
            raise ConvertError(self._path, f"the record of oid {int.from_bytes(oid, 'big')} "
                                           f"is a {cls.module}.{name}, which pstore does "
                                           f"not convert")
        is_set = name.endswith("Set")
        obj: Any = set() if is_set else {}
        self._converted[oid] = obj
        for item in self._tree_items(state, name.endswith(("BTree", "TreeSet")), is_set):
            if is_set:
                obj.add(self._resolve(item))
            else:
                obj[self._resolve(item[0])] = self._resolve(item[1])
        return obj

    def _tree_items(self, state: Any, is_tree: bool, is_set: bool) -> Iterator[Any]:
        """The items of a BTree or TreeSet (``is_tree``), or a Bucket or Set, in order.

        A tree's state is None (empty), ``((bucket state,),)`` (one bucket, inline), or
        ``(children and keys, first bucket)``; a bucket's ``(flat items,)`` or ``(flat
        items, next bucket)``. Buckets are followed in a loop, not recursively.
        """
        if state is None:
            return
        if is_tree and len(state) == 1:     # one bucket, inline
            state = state[0][0]
        elif is_tree:
            _, state = self._record(state[1].oid)
        step = 1 if is_set else 2
        while True:
            flat = state[0]
            for index in range(0, len(flat), step):
                yield flat[index] if is_set else (flat[index], flat[index + 1])
            if len(state) < 2 or not isinstance(state[1], _Ref):
                return
            _, state = self._record(state[1].oid)

    def _resolve(self, value: Any) -> Any:
        """``value`` with every _Ref replaced by its converted object."""
        if isinstance(value, _Ref):
            return self._object(value.oid)
        kind = type(value)
        if kind is dict:
            return {self._resolve(k): self._resolve(v) for k, v in value.items()}
        if kind is list:
            return [self._resolve(item) for item in value]
        if kind is tuple:
            return tuple(self._resolve(item) for item in value)
        if kind in (set, frozenset):
            return kind(self._resolve(item) for item in value)
        return value


def _mapping_data(state: Any) -> Any:
    # PersistentMapping/List keep their items under "data" ("_container" before ZODB 3.5).
    if isinstance(state, dict):
        for name in ("data", "_container"):
            if name in state:
                return state[name]
    raise ValueError(f"not the state of a PersistentMapping/List: {state!r:.80}")


class _Ref:
    __slots__ = ("oid",)

    def __init__(self, oid: bytes) -> None:
        self.oid = oid


class _Global:
    """A class of ZODB's (persistent, BTrees) that a record names, kept as a name."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name


class _ZODBUnpickler(engine.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        # ZODB's own classes are kept as names, never imported; the application's
        # classes are needed to rebuild its objects.
        if module.split(".")[0] in ("persistent", "BTrees") or module == "ZODB.blob":
            return _Global(module, name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        # ZODB's persistent ids: an oid, or (oid, class); weak and cross-database
        # references (lists) are not converted.
        if isinstance(pid, bytes):
            return _Ref(pid)
        if isinstance(pid, tuple) and pid and isinstance(pid[0], bytes):
            return _Ref(pid[0])
        raise ConvertError(self._path, f"a reference pstore does not convert: {pid!r:.80} "
                                       f"(weak or cross-database)")


_SOURCES: dict[str, Callable[[str, str | None, ConvertReport], _Source]] = {
    "shelve": _ShelveSource,
    "sqlitedict": _SqliteDictSource,
    "diskcache": _DiskCacheSource,
    "zodb": _ZODBSource,
}


class CopyError(Error, ValueError):
    """A store cannot be copied as asked: the target is not empty or is the source, the
    source changed during the copy, or a blob comes out under another name in the target."""

    def __init__(self, source: str, target: str, reason: str) -> None:
        super().__init__(source, target, reason)
        self.source = source
        self.target = target
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot copy {self.source!r} into {self.target!r}: {self.reason}"


def copy(source: str | os.PathLike[str], target: str | os.PathLike[str], *,
         backend: str | None = None, source_backend: str | None = None, flag: str = "c",
         lock_timeout: float = DEFAULT_LOCK_TIMEOUT, fsync: bool = False,
         progress: Callable[[int], None] | None = None) -> int:
    """Copy the store ``source`` into the empty store ``target``, record by record; return
    how many keys it copied.

    Any backend to any backend: ``source_backend`` and ``backend`` (``target``'s) as
    :func:`pstore.open` takes them; None tells each from its URL or files (a new target:
    SQLite). ``flag`` opens ``target`` ('c', 'n' to empty it first, 'w'); a target that
    holds a key or a record is refused with :class:`CopyError`.

    Nothing is unpickled: every record is copied under its object id with its bytes,
    references (lazy ones too) and blob names; every blob it uses is copied once, by
    content; every key is bound to the same object id. So identity, sharing and
    Persistent objects are exactly the source's, and no code of the source runs. Each
    record's digest is checked on the way (:class:`~pstore.errors.CorruptionError`
    naming its object id); a record written before format version 3, without one, is
    given one (its payload unchanged). The target's id allocation continues above the
    largest copied id.

    The copy is one transaction of ``target``: all or nothing. If another process
    commits to ``source`` meanwhile, nothing is written and :class:`CopyError` says so
    (run it again). Stores left open on ``target`` from before the copy must not write
    to it afterwards: ids they had reserved may be the copied ones. ``progress(n)`` is
    called as records are copied, with how many since the last call.
    """
    source_path, target_path = os.fsdecode(os.fspath(source)), os.fsdecode(os.fspath(target))
    if _same_location(source_path, target_path):
        raise CopyError(source_path, target_path, "they are the same store")
    reader = open_backend(source_backend or detect_backend(source_path) or "sqlite",
                          source_path, "r", lock_timeout=lock_timeout, fsync=False)
    try:
        writer = open_backend(backend or detect_backend(target_path) or "sqlite", target_path,
                              flag, lock_timeout=lock_timeout, fsync=fsync)
        try:
            if not isinstance(writer, Backend):     # a reader-only backend (shelve)
                raise CopyError(source_path, target_path, f"backend {type(writer).__name__} "
                                f"cannot write a store")
            return _copy_records(reader, writer, progress)
        finally:
            writer.close()
    finally:
        reader.close()


def _same_location(first: str, second: str) -> bool:
    if "://" in first or "://" in second:
        return first == second
    return os.path.realpath(first) == os.path.realpath(second)


def _copy_records(reader: ReadableBackend, writer: Backend,
                  progress: Callable[[int], None] | None) -> int:
    """Copy every record, blob and key of ``reader`` into the empty ``writer``, in one
    transaction of ``writer``."""
    def refuse(reason: str) -> CopyError:
        return CopyError(reader.path, writer.path, reason)

    marker = reader.change_marker()
    writer.begin()
    try:
        keys = writer.count_keys()
        if keys or next(iter(writer.iter_records()), None) is not None:
            raise refuse(f"the target is not empty ({keys} keys"
                         f"{'' if keys else ', and records'}); flag 'n' "
                         f"(pstore copy --flag n) empties it first")
        copied_blobs: set[str] = set()
        largest = 0
        for oid, data, refs in reader.iter_records():
            data, blobs = _checked_record(reader, oid, data)
            for name in blobs.difference(copied_blobs):
                if writer.put_blob(reader.read_blob(name)) != name:
                    raise refuse(f"blob {name} of object id {oid} gets another name in the "
                                 f"target: its backend names blobs by another digest")
                copied_blobs.add(name)
            eager = set(reader.refs_of(oid, lazy=False)) if refs else set()
            writer.put_record(oid, data, refs, lazy_refs=[ref for ref in refs if ref not in eager],
                              blobs=sorted(blobs))
            largest = max(largest, oid)
            if progress is not None:
                progress(1)
        # Before any id is allocated in the target (none is during the copy).
        writer.reserve_ids(largest)
        count = 0
        bindings: list[tuple[str, int]] = []
        for key in reader.iter_keys():
            bound = reader.get_key(key)
            if bound is not None:
                bindings.append((key, bound))
            if len(bindings) == _BIND_BATCH:
                count += _bind(writer, bindings)
        count += _bind(writer, bindings)
        if reader.change_marker() != marker:
            raise refuse("another process committed to the source during the copy; "
                         "nothing was written, run it again")
        writer.commit()
    except BaseException:
        writer.rollback()
        raise
    return count


#: How many keys the copy binds with one call of the target's ``bind_keys``.
_BIND_BATCH = 1000


def _bind(writer: Backend, bindings: list[tuple[str, int]]) -> int:
    """Bind ``bindings`` in ``writer`` (then empty the list); return how many."""
    writer.bind_keys(bindings)
    count = len(bindings)
    bindings.clear()
    return count


def _checked_record(reader: ReadableBackend, oid: int, data: bytes) -> tuple[bytes, set[str]]:
    """``(data, blob names)`` of record ``oid`` as the target gets it: its digest checked,
    and given one if it was written before format version 3."""
    try:
        unpacked = records.unpack(data, oid, digest_required=oid >= reader.digests_from)
    except ValueError as error:
        raise CorruptionError(reader.path, str(error), object_id=oid) from error
    if not unpacked.verified:
        data = records.pack(oid, unpacked.payload, unpacked.blobs, codec=0)
    return data, {blob.name for blob in unpacked.blobs}
