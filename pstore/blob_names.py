"""Blob names: the digest of a blob's bytes, and the hash that made it.

A blob's name says which hash made it (``docs/format.md``, "Blobs"): a BLAKE3 name
is ``b3-`` and the 64 hex digits of its digest; a name of 64 hex digits alone is the
BLAKE2b hash tree of format versions up to 3. New blobs get BLAKE3 names. Both
layers use this module: the backends name and file blobs by it, the store layer's
record envelopes (:mod:`pstore.store.records`) write and read the names it makes, so it
belongs to neither. It needs nothing but the standard library to be imported;
``blake3`` is imported when a BLAKE3 name is computed.
"""

from __future__ import annotations

from typing import Any

from ._blake2 import blake2b
from .errors import MissingModuleError

__all__ = ["BLAKE2B_TREE", "BLAKE3", "LEAF_SIZE", "NAME_PREFIXES", "BlobHasher", "blob_digest",
           "digest_of_name", "fan_out_of", "name_of_digest", "naming_of"]

#: The hashes that name blobs (the numbers are what record envelopes store).
BLAKE2B_TREE = 0
BLAKE3 = 1
#: naming -> the prefix of its names (the number is what record envelopes store).
NAME_PREFIXES = {BLAKE2B_TREE: "", BLAKE3: "b3-"}
#: The BLAKE2b hash tree's leaves are this many bytes (the last one may be shorter).
LEAF_SIZE = 1 << 24
_DIGEST_SIZE = 32
_HEX_SIZE = 2 * _DIGEST_SIZE
_HEX_DIGITS = frozenset("0123456789abcdef")


def _blake3() -> Any:
    """The ``blake3`` package's hasher class. Imported when first needed: the engine and
    reading stores work without it (an interpreter where pstore's dependencies are not
    installed), writing a blob does not."""
    try:
        import blake3
    except ImportError:
        raise MissingModuleError("blake3", "naming new blobs",
                                 "pip install blake3 (a dependency of pstore)") from None
    return blake3.blake3


def _blake2b_tree_digest(view: memoryview) -> str:
    """Format versions up to 3: BLAKE2b-256 (person ``pstore-blob``) of the size as 8
    little-endian bytes followed by the BLAKE2b-256 digests (person ``pstore-leaf``) of
    the consecutive 16 MiB leaves. Only verification computes it now."""
    root = blake2b(len(view).to_bytes(8, "little"), digest_size=_DIGEST_SIZE,
                           person=b"pstore-blob")
    for start in range(0, len(view) or 1, LEAF_SIZE):
        root.update(blake2b(view[start:start + LEAF_SIZE], digest_size=_DIGEST_SIZE,
                                    person=b"pstore-leaf").digest())
    return root.hexdigest()


def blob_digest(data: Any, naming: int = BLAKE3) -> str:
    """The name of a blob holding the bytes of buffer ``data``, by the hash ``naming``
    (:data:`BLAKE3`, what new blobs get, or :data:`BLAKE2B_TREE`, format versions up
    to 3). ``docs/format.md`` describes both."""
    view = memoryview(data).cast("B")
    if naming == BLAKE3:
        return NAME_PREFIXES[BLAKE3] + _blake3()(view).hexdigest()
    if naming == BLAKE2B_TREE:
        return _blake2b_tree_digest(view)
    raise ValueError(f"blob naming {naming} is unknown")


def digest_of_name(name: str) -> tuple[int, bytes] | None:
    """(naming, the 32 digest bytes) that blob name ``name`` holds; None if it is not the
    name of a blob."""
    for naming, prefix in NAME_PREFIXES.items():
        digits = name[len(prefix):]
        if (name.startswith(prefix) and len(digits) == _HEX_SIZE
                and set(digits) <= _HEX_DIGITS):
            return naming, bytes.fromhex(digits)
    return None


def naming_of(name: str) -> int:
    """The hash that made blob name ``name`` (``ValueError`` if it is no blob name)."""
    found = digest_of_name(name)
    if found is None:
        raise ValueError(f"{name!r} is not a blob name")
    return found[0]


def name_of_digest(naming: int, digest: bytes) -> str:
    """The blob name of ``digest`` (32 bytes) made by ``naming``; ``ValueError`` for a
    naming this pstore does not know."""
    if naming not in NAME_PREFIXES:
        raise ValueError(f"blob naming {naming} is unknown")
    return NAME_PREFIXES[naming] + digest.hex()


def fan_out_of(name: str) -> str:
    """The fan-out folder of blob ``name``: the first two hex digits of its digest (no
    BLAKE2b name starts with the BLAKE3 prefix: hex digits only)."""
    return name.removeprefix(NAME_PREFIXES[BLAKE3])[:2]


class BlobHasher:
    """The name of a new blob whose bytes arrive a chunk at a time.

    BLAKE3 is a hash tree itself, so any chunking gives the same name. One thread,
    the writer's: BLAKE3 hashes ~4 GB/s on one core here (BLAKE2b: 0.9), and neither
    ``blake3``'s ``max_threads`` nor hashing in a second thread while the writer writes
    measured faster on two busy cores (docs/datasets.md, "Blob names").
    """

    def __init__(self) -> None:
        self._hash = _blake3()()

    def update(self, chunk: Any) -> None:
        self._hash.update(chunk)

    def name(self) -> str:
        return NAME_PREFIXES[BLAKE3] + self._hash.hexdigest()
