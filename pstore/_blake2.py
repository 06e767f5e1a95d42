"""BLAKE2b, the hash of record digests, key seals, lock names and blob names.

``hashlib`` loads OpenSSL (``_hashlib``) at import, a few milliseconds that
``import pstore`` need not pay: its ``blake2b`` is always the built-in
``_blake2.blake2b``, taken here directly where the interpreter has it.
"""

from __future__ import annotations

try:
    from _blake2 import blake2b
except ImportError:     # an interpreter without the built-in module
    from hashlib import blake2b

__all__ = ["blake2b"]
