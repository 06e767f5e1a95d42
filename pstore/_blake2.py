"""BLAKE2b, the hash of record digests, key seals, lock names and blob names.

``hashlib`` loads OpenSSL (``_hashlib``) at import, a few milliseconds that
``import pstore`` need not pay: its ``blake2b`` is always the built-in
``_blake2.blake2b``, taken here directly where the interpreter has it.

:func:`digest_of` is the one-shot form the hot paths use (a record's digest and MAC,
a binding's seal, at every get and set): the C module ``pstore._blake2_speedups``
where it is built and ``PSTORE_PURE_PYTHON`` is not set, else ``blake2b`` -- the
same bytes either way. The C module also checks the common record's envelope in one
call (:data:`open_envelope`, used by :func:`pstore.store.records.unpack`) and writes it
in one (:data:`seal_plain`, used by :func:`pstore.store.records.pack`), and seals key
bindings (:data:`key_seal`, behind :func:`pstore.backends.base.binding_seal`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

try:
    from _blake2 import blake2b
except ImportError:     # an interpreter without the built-in module
    from hashlib import blake2b

__all__ = ["blake2b", "digest_of", "key_seal", "open_envelope", "seal_plain"]


def _pure_digest_of(parts: tuple[Any, ...], digest_size: int, key: bytes = b"",
                    salt: bytes = b"", person: bytes = b"") -> bytes:
    hasher = blake2b(digest_size=digest_size, key=key, salt=salt, person=person)
    for part in parts:
        hasher.update(part)
    return hasher.digest()


def _compiled() -> Any:
    if os.environ.get("PSTORE_PURE_PYTHON"):
        return None
    try:
        return importlib.import_module(f"{__package__}._blake2_speedups")
    except ImportError:     # installed without a C compiler
        return None


_speedups = _compiled()
#: ``digest_of(parts, digest_size, key, salt, person)``: BLAKE2b of the bytes-like
#: objects of tuple ``parts`` joined, with those parameters (all five positional in C).
digest_of: Callable[..., bytes] = \
    _speedups.digest if _speedups is not None else _pure_digest_of
#: ``open_envelope(data, oid, fingerprint, mac_key)``: the C check of the common record's
#: envelope, ``(payload, signed)`` or None (see ``records.unpack``); None without C.
open_envelope: Callable[[bytes, int, bytes | None, bytes], tuple[bytes, bool] | None] | None = \
    getattr(_speedups, "open_envelope", None)   # None also from a module built before it
#: ``seal_plain(payload, oid, fingerprint, mac_key)``: the common record written in one C
#: call, the bytes ``records.pack`` makes for it (fingerprint None: unsigned); None without C.
seal_plain: Callable[[bytes, int, bytes | None, bytes], bytes] | None = \
    getattr(_speedups, "seal_plain", None)
#: ``key_seal(key, oid)``: a key binding's seal in one C call (see
#: ``pstore.backends.base.binding_seal``); None without C.
key_seal: Callable[[str, int], bytes] | None = getattr(_speedups, "key_seal", None)
