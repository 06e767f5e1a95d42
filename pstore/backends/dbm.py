"""The DBM backend: a store in a database of one of the standard library's ``dbm`` modules.

The store's layout over the database's keys -- records, their refs, referrer counts,
key bindings and key pages, meta keys and the ``m:check`` digest over them -- is
here (``docs/format.md``; its keys are named in :mod:`.dbm_layout`). What the DBM
modules lack -- transactions, crash safety, locks across processes, change detection
-- is :class:`~.dbm_database.JournaledDatabase`'s; the adapters over the modules are
in :mod:`.dbm_modules`. When to use this backend: ``docs/backends.md``. Files written
by the standard library's ``shelve`` are read by :mod:`.shelf`.
"""

from __future__ import annotations

import platform
import sqlite3
import struct
from collections.abc import Collection, Hashable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from ..errors import CorruptionError, Error, FormatError
from . import journal
from .base import Backend, Statistics, binding_seal, check_meta_name, check_reserved
from .dbm_database import Getter, JournaledDatabase
from .dbm_layout import (
    CHECK,
    DIGESTS_FROM,
    FORMAT,
    FORMAT_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    FREE_PAGES,
    KEY_COUNT,
    MAX_OID,
    NEXT_OID,
    OPEN_PAGE,
    PAGE_COUNT,
    PAGE_KEYS,
    VERSION,
    blobs_key,
    check_meta,
    count_key,
    encode_key,
    key_key,
    lazy_key,
    meta_digest,
    pack_ints,
    pack_names,
    pack_page,
    page_key,
    record_key,
    refs_key,
    unpack_ints,
    unpack_names,
    unpack_page,
)
from .dbm_modules import MODULES, choose_module, whichdb
from .files import key_lock_file, require_existing, store_owner
from .local_blobs import LocalBlobs

__all__ = ["FORMAT_KEY", "FORMAT_NAME", "FORMAT_VERSION", "MODULES", "DBMBackend",
           "choose_module"]


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
    from many processes at once; flag ``'r'`` writes nothing; flag ``'n'`` empties
    a store in one transaction, under the write lock.
    """

    name = "dbm"
    takes_variant = True

    def __init__(self, path: str, flag: str, *, lock_timeout: float, fsync: bool,
                 variant: str | None = None) -> None:
        self.path = path
        self.read_only = flag == "r"
        found = whichdb(path)
        # 'n' on a store of the same module empties it in a transaction (see _empty).
        keeps = flag == "n" and bool(found) and variant in (None, found)
        module = choose_module(path, "c" if keeps else flag, variant)
        #: The database underneath, with transactions: every read and write goes through it.
        self.database = db = JournaledDatabase(
            path, module, read_only=self.read_only, lock_timeout=lock_timeout, fsync=fsync,
            owner=store_owner(module.files(path)), validate=self._validate_journal,
            on_end=self._end_blobs)     # blobs end still under the lock: see BlobStore.end
        self._reading, self._get, self._put = db.reading, db.get, db.put
        self._get_int, self._put_int = db.get_int, db.put_int
        self._tx_pages: dict[int, list[bytes]] = {}   # the open transaction's key pages
        self._sealed = True     # whether key bindings carry seals (format version 3)
        self._pages_sealed = True   # whether key pages do (format version 5)
        try:
            if flag == "n" and found and not keeps:
                db.remove_files()   # not a store to empty: its files are replaced
            require_existing(path, flag, lambda: whichdb(path) is not None)
            if flag in ("c", "n"):
                db.create()
            try:
                self._check_format(create=flag in ("c", "n"))
            except (FormatError, CorruptionError):
                if flag != "n":
                    raise
                # Not a store this code can empty (foreign, newer, damaged): replaced.
                db.remove_files()
                db.create()
                self._check_format(create=True)
            if flag == "n":
                self._empty()
        except BaseException:
            self.close()
            raise

    # -- opening ----------------------------------------------------------------------------

    def _empty(self) -> None:
        """Flag 'n' on a pstore store: delete every record, key and blob in one transaction.

        Other open stores see an empty store at their next read, and their later writes
        land in this same database.
        """
        self.begin()
        try:
            for key in list(self.database.keys()):
                if key not in (FORMAT, VERSION) and self._get(key) is not None:
                    self._put(key, None)
            self._tx_pages.clear()
            self.collect_blobs(set())
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def _check_format(self, create: bool) -> None:
        module = self.database.module
        try:
            with self.database.snapshot() as snapshot:
                fmt, version = snapshot.get(FORMAT), snapshot.get(VERSION)
                digests_from = snapshot.get(DIGESTS_FROM)
                empty = fmt is None and snapshot.empty
                if fmt == FORMAT_NAME:
                    check_meta(self.path, snapshot.get, snapshot.tally(), module.name)
        except Error:   # pstore's own (a lock timeout, damage, an unsafe side file)
            raise
        except (OSError, ValueError, SyntaxError, sqlite3.DatabaseError) as error:
            # what the modules raise on junk (dbm.sqlite3: sqlite3's own errors)
            raise FormatError(self.path, f"not a readable {module.name} database "
                                         f"({error})") from None
        if empty and create:
            self._initialize()
        elif empty:
            raise FormatError(self.path, "an empty database")
        elif fmt != FORMAT_NAME or version is None or not version.isdigit():
            raise FormatError(self.path, f"a {module.name} database without pstore's "
                                         f"meta keys (for a shelve file: backend='shelve')")
        elif int(version) > FORMAT_VERSION:
            raise FormatError(self.path, f"format version {int(version)} was written by a "
                                         f"newer pstore; this one reads up to {FORMAT_VERSION}")
        elif int(version) < FORMAT_VERSION and not self.read_only:
            self._upgrade()
        else:
            self._sealed = int(version) >= 3
            self._pages_sealed = int(version) >= 5
            if not self._sealed:
                self.digests_from = 1 << 63     # any record may predate digests
            elif digests_from is not None and digests_from.isdigit():
                self.digests_from = int(digests_from)

    def _upgrade(self) -> None:
        """Bring an older database to the current version: a version 1 one has no lazy
        refs and no blobs, which is what missing ``l:`` and ``b:`` keys mean; before
        version 3 key bindings have no seal (added here) and records no digest (those
        written from now on have one); before version 5 key pages have no seal (every page
        is read here and written back sealed at the commit)."""
        self.begin()
        try:
            self._pages_sealed = self._get_int(VERSION) >= 5
            if not self._pages_sealed:
                for number in range(self._get_int(PAGE_COUNT)):
                    self._page(number)      # kept by the transaction, sealed at its commit
            if self._get_int(VERSION) < 3:
                for keys in self._pages():
                    for key in keys:
                        binding = self._get(b"k:" + key)    # a listed key has one
                        oid, page = (int(part) for part in binding.split()[:2])  # type: ignore[union-attr]
                        self._put(b"k:" + key, self._binding_value(
                            key.decode("utf-8", "surrogatepass"), oid, page))
                self._put(DIGESTS_FROM, b"%d" % self._get_int(NEXT_OID, 1))
            self._put(VERSION, b"%d" % FORMAT_VERSION)
            self.digests_from = self._get_int(DIGESTS_FROM, 1)
            self.commit()
            self._pages_sealed = True
        except BaseException:
            self.rollback()
            raise

    def _initialize(self) -> None:
        self.begin()
        try:
            # Another process may have initialized it while this one waited for the lock.
            if self._get(FORMAT) is None:
                self._put(FORMAT, FORMAT_NAME)
                self._put(VERSION, b"%d" % FORMAT_VERSION)
                self._put(DIGESTS_FROM, b"1")
            self.commit()
        except BaseException:
            self.rollback()
            raise

    def _validate_journal(self, changes: journal.Changes, stored: Getter) -> None:
        """Refuse a journal whose meta keys do not match the digest its m:check holds:
        one that changes the metadata as no commit did is never applied."""
        digest = meta_digest(lambda key: changes[key] if key in changes else stored(key))
        check = changes.get(CHECK)
        if check is None or check.partition(b" ")[2] != digest:
            raise CorruptionError(self.path + ".journal", "the journal's meta keys do not "
                                  "match the digest its m:check holds")

    def problems(self) -> list[str]:
        """What this backend found damaged and set aside, for ``Store.verify()``: journals
        that failed their check (this session's, and every one moved aside earlier)."""
        return self.database.problems()

    # -- records ----------------------------------------------------------------------------

    def new_oid(self) -> int:
        # The counter never goes back, so ids freed by gc are never reused: another
        # process may still hold an object under such an id.
        oid = self._get_int(NEXT_OID, 1)
        if oid >= MAX_OID or self._get(record_key(oid)) is not None:
            # A counter set back (or past the last id) by damage: allocating would
            # overwrite a record.
            problem = "is out of range" if oid >= MAX_OID else "has a record"
            raise CorruptionError(self.path, f"meta key m:next_oid is {oid}, an id that "
                                             f"{problem}")
        self._put_int(NEXT_OID, oid + 1)
        return oid

    def reserve_ids(self, up_to: int) -> None:
        check_reserved(up_to)
        if self._get_int(NEXT_OID, 1) <= up_to:
            self._put_int(NEXT_OID, up_to + 1)

    def get_record(self, oid: int) -> bytes | None:
        with self._reading():
            return self._get(record_key(oid))

    def put_record(self, oid: int, data: bytes, refs: Collection[int],
                   *, lazy_refs: Collection[int] = (), blobs: Collection[str] = ()) -> None:
        old = set(unpack_ints(self._get(refs_key(oid))))
        new = set(refs)
        for ref in old - new:
            self._add_referrers(ref, -1)
        for ref in new - old:
            self._add_referrers(ref, 1)
        self._put(record_key(oid), data)
        self._put(refs_key(oid), pack_ints(sorted(new)) if new else None)
        if lazy_refs or self._get(lazy_key(oid)) is not None:
            self._put(lazy_key(oid), pack_ints(sorted(lazy_refs)) if lazy_refs else None)
        if blobs or self._get(blobs_key(oid)) is not None:
            self._put(blobs_key(oid), pack_names(blobs))

    def delete_record(self, oid: int) -> None:
        for ref in unpack_ints(self._get(refs_key(oid))):
            self._add_referrers(ref, -1)
        self._put(record_key(oid), None)
        self._put(refs_key(oid), None)
        self._put(blobs_key(oid), None)
        if self._get(lazy_key(oid)) is not None:
            self._put(lazy_key(oid), None)

    def _add_referrers(self, oid: int, delta: int) -> None:
        """Change the number of keys and records referring to ``oid`` by ``delta``.

        The count is what makes :meth:`is_referenced` one lookup: a DBM has no index
        from a ref back to the records holding it.
        """
        count = self._get_int(count_key(oid)) + delta
        self._put(count_key(oid), b"%d" % count if count else None)

    def existing(self, oids: Collection[int]) -> set[int]:
        with self._reading():
            return {oid for oid in oids if self._get(record_key(oid)) is not None}

    def is_referenced(self, oid: int) -> bool:
        with self._reading():
            return self._get(count_key(oid)) is not None

    def refs_of(self, oid: int, *, lazy: bool = True) -> Collection[int]:
        with self._reading():
            refs = unpack_ints(self._get(refs_key(oid)))
            if lazy or not refs:
                return refs
            lazy_refs = unpack_ints(self._get(lazy_key(oid)))
            return set(refs).difference(lazy_refs) if lazy_refs else refs

    def blobs_of(self, oid: int) -> Collection[str]:
        with self._reading():
            return unpack_names(self._get(blobs_key(oid)))

    def record_ids(self) -> Iterator[int]:
        """Every record's object id: the database's ``r:`` keys, and the transaction's.

        Reads the module's list of keys at once: memory grows with the number of
        entries (their keys only), as the live set of :meth:`gc` does.
        """
        with self._reading():
            keys = self.database.keys()
            oids = [int(key[2:]) for key in keys
                    if key.startswith(b"r:") and key[2:].isdigit() and self._get(key) is not None]
            next_oid = self._get_int(NEXT_OID, 1)
        for oid in oids:
            if oid >= next_oid:
                raise CorruptionError(self.path, f"a record has object id {oid}, not below "
                                                 f"meta key m:next_oid ({next_oid})",
                                      object_id=oid)
        return iter(oids)

    def bound_ids(self) -> Iterator[int]:
        for keys in self._pages():
            with self._reading():
                oids = [self._paged_oid(key) for key in keys]
            yield from oids

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
        value = self._get(key_key(key))
        return None if value is None else self._unsealed(key, value)

    def _paged_oid(self, key: bytes) -> int:
        """The object id of ``key`` (encoded), which a key page lists, so is bound."""
        value = self._get(b"k:" + key)
        if value is None:
            raise CorruptionError(self.path, "a key page lists it, but it is unbound",
                                  key=key.decode("utf-8", "surrogatepass"))
        return self._unsealed(key.decode("utf-8", "surrogatepass"), value)[0]

    def get_meta(self, name: str) -> str | None:
        check_meta_name(name)
        with self._reading():
            value = self._get(b"m:" + name.encode("ascii"))
        return None if value is None else value.decode("utf-8", "replace")

    def set_meta(self, name: str, value: str) -> None:
        check_meta_name(name)
        self._put(b"m:" + name.encode("ascii"), value.encode("utf-8"))

    def get_key(self, key: str) -> int | None:
        with self._reading():
            binding = self._binding(key)
        return None if binding is None else binding[0]

    def get_item(self, key: str) -> tuple[int, bytes | None] | None:
        with self._reading():
            binding = self._binding(key)
            return None if binding is None else (binding[0], self._get(record_key(binding[0])))

    def bind_key(self, key: str, oid: int) -> int | None:
        binding = self._binding(key)
        if binding is None:
            page = self._add_to_page(encode_key(key))
            self._put_int(KEY_COUNT, self._get_int(KEY_COUNT) + 1)
        else:
            previous, page = binding
            if previous == oid:
                return previous
            self._add_referrers(previous, -1)
        self._add_referrers(oid, 1)
        self._put(key_key(key), self._binding_value(key, oid, page))
        return None if binding is None else binding[0]

    def unbind_key(self, key: str) -> int | None:
        binding = self._binding(key)
        if binding is None:
            return None
        oid, page = binding
        self._remove_from_page(page, encode_key(key))
        self._put_int(KEY_COUNT, self._get_int(KEY_COUNT) - 1)
        self._add_referrers(oid, -1)
        self._put(key_key(key), None)
        return oid

    # Key pages list the bound keys for iteration, a page at a time; see docs/format.md.
    # A key stays in its page while it is bound, so an iteration that reads the pages
    # one by one sees every key that stays bound exactly once.

    def _page(self, number: int) -> list[bytes]:
        """The keys of page ``number``; in a transaction, the list its changes go to.

        A transaction keeps the pages it touches decoded, and encodes them once, at
        commit (see _flush_pages): binding many keys costs no page encoding each.
        """
        if self.database.changes is None:
            return self._read_page(number)
        keys = self._tx_pages.get(number)
        if keys is None:
            keys = self._tx_pages[number] = self._read_page(number)
        return keys

    def _read_page(self, number: int) -> list[bytes]:
        try:
            return unpack_page(self._get(page_key(number)), number, sealed=self._pages_sealed)
        except (ValueError, struct.error) as error:
            raise CorruptionError(self.path, str(error)) from None

    def _flush_pages(self) -> None:
        for number, keys in self._tx_pages.items():
            self._put(page_key(number), pack_page(keys, number) if keys else None)
        self._tx_pages.clear()

    def _add_to_page(self, key: bytes) -> int:
        number = self._get_int(OPEN_PAGE, -1)
        keys = self._page(number) if number >= 0 else []
        if number < 0 or len(keys) >= PAGE_KEYS:
            free = unpack_ints(self._get(FREE_PAGES))
            if free:
                number = free.pop()
                self._put(FREE_PAGES, pack_ints(free) if free else None)
            else:
                number = self._get_int(PAGE_COUNT)
                self._put_int(PAGE_COUNT, number + 1)
            self._put_int(OPEN_PAGE, number)
            keys = self._page(number)
        keys.append(key)
        return number

    def _remove_from_page(self, number: int, key: bytes) -> None:
        keys = self._page(number)
        keys.remove(key)
        # A page that falls below half full is filled again later, so that pages
        # stay dense however keys come and go; it crosses half only once before then.
        if len(keys) == PAGE_KEYS // 2 - 1 and number != self._get_int(OPEN_PAGE, -1):
            free = unpack_ints(self._get(FREE_PAGES))
            self._put(FREE_PAGES, pack_ints([*free, number]))

    def _pages(self) -> Iterator[list[bytes]]:
        """The key pages, each read in one locked step; no lock is held between pages."""
        with self._reading():
            count = self._get_int(PAGE_COUNT)
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
            count = self._get_int(PAGE_COUNT)
        for number in range(count):
            with self._reading():
                items = []
                for key in self._page(number):
                    oid = self._paged_oid(key)
                    items.append((key.decode("utf-8", "surrogatepass"), oid,
                                  self._get(record_key(oid))))
            yield from items

    def count_keys(self) -> int:
        with self._reading():
            return self._get_int(KEY_COUNT)

    # -- transactions -----------------------------------------------------------------------

    def begin(self) -> None:
        self.database.begin()

    def commit(self) -> None:
        self._settle_blobs()    # the blobs the records name are durable before them
        changes = self.database.changes
        if changes is not None:
            self._flush_pages()
            if changes:
                self._seal(changes)
        self.database.commit()

    def _seal(self, changes: dict[bytes, bytes | None]) -> None:
        """Put ``m:check`` (see check_meta) for the state ``changes`` lead to."""
        changes[CHECK] = b""   # counted as an entry of its own
        tally = self.database.tally_after(changes)
        changes[CHECK] = b"%s %s" % (b"-" if tally is None else tally, meta_digest(self._get))

    def rollback(self) -> None:
        self._tx_pages.clear()
        self.database.rollback()

    def change_marker(self) -> Hashable:
        return self.database.change_marker()

    def begin_read(self) -> None:
        self.database.begin_read()

    def end_read(self) -> None:
        self.database.end_read()

    # -- maintenance: reaches() and gc() are the base's, over refs_of and record_ids ----

    def statistics(self) -> Statistics:
        records = record_bytes = 0
        for oid in self.record_ids():
            data = self.get_record(oid)
            if data is not None:
                records += 1
                record_bytes += len(data)
        with self._reading():
            version = int(self._get(VERSION) or 0)
        blobs, blob_bytes = self._blob_usage()
        return Statistics(f"{self.database.module.name} (Python {platform.python_version()})",
                          version, records, record_bytes, blobs, blob_bytes)

    def vacuum(self) -> int:
        """See :meth:`JournaledDatabase.vacuum <.dbm_database.JournaledDatabase.vacuum>`:
        in place, or by a rewrite that a crash at any moment leaves whole."""
        return self.database.vacuum(CHECK, self._check_of_rewrite)

    def _check_of_rewrite(self, new: Any, check: bytes) -> bytes:
        """``m:check`` of rewritten database ``new``: the tally it holds changes (deleted
        entries are gone), the digest of the meta keys does not."""
        tally = self.database.module.tally(new)
        return b"%s %s" % (b"-" if tally is None else tally, check.partition(b" ")[2])

    def key_lock(self, key: str, timeout: float) -> AbstractContextManager[None]:
        return key_lock_file(self.path, key, timeout)

    def after_fork(self) -> None:
        self.database.after_fork()
        self._tx_pages.clear()

    def close(self) -> None:
        self._tx_pages.clear()
        try:
            self.database.close()
        finally:
            self._close_blobs()
