"""pstore._blake2.digest_of: the C one-shot BLAKE2b against hashlib's, and its pure fallback."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pstore import _blake2
from pstore.backends.base import binding_seal
from pstore.store import records
from pstore.store.signing import Signer

try:
    from pstore._blake2_speedups import digest as c_digest
except ImportError:     # built without a compiler: the pure path is all there is
    c_digest = None

needs_c = pytest.mark.skipif(c_digest is None, reason="pstore._blake2_speedups is not built")
IMPLEMENTATIONS = [_blake2._pure_digest_of, *([c_digest] if c_digest is not None else [])]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hashlib(data: bytes, size: int, key: bytes, salt: bytes, person: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=size, key=key, salt=salt, person=person).digest()


@pytest.mark.parametrize("digest_of", IMPLEMENTATIONS)
@given(data=st.binary(max_size=1200), cuts=st.lists(st.integers(0, 1200), max_size=4),
       size=st.integers(1, 64), key=st.binary(max_size=64), salt=st.binary(max_size=16),
       person=st.binary(max_size=16))
def test_digest_of_is_hashlibs_blake2b(digest_of, data, cuts, size, key, salt, person):
    # The parts, of any sizes (block boundaries included), hash as their join.
    bounds = [0, *sorted(min(cut, len(data)) for cut in cuts), len(data)]
    parts = tuple(memoryview(data)[a:b] if i % 2 else data[a:b]
                  for i, (a, b) in enumerate(pairwise(bounds)))
    assert digest_of(parts, size, key, salt, person) == _hashlib(data, size, key, salt, person)


@needs_c
@pytest.mark.parametrize("length", [0, 1, 127, 128, 129, 255, 256, 257, 128 * 40, 128 * 40 + 1])
@pytest.mark.parametrize("key", [b"", b"k", bytes(range(64))])
def test_block_boundaries(length, key):
    data = os.urandom(length)
    assert c_digest((data,), 64, key, b"", b"") == _hashlib(data, 64, key, b"", b"")
    assert c_digest((data[:1], data[1:]), 16, key, b"s", b"p") == _hashlib(data, 16, key,
                                                                           b"s", b"p")


@needs_c
@pytest.mark.parametrize("args, error, message", [
    (((b"",), 0, b"", b"", b""), ValueError, "digest_size"),
    (((b"",), 65, b"", b"", b""), ValueError, "digest_size"),
    (((b"",), 16, bytes(65), b"", b""), ValueError, "key length"),
    (((b"",), 16, b"", bytes(17), b""), ValueError, "salt length"),
    (((b"",), 16, b"", b"", bytes(17)), ValueError, "person length"),
    (([b""], 16, b"", b"", b""), TypeError, "tuple"),
    ((("text",), 16, b"", b"", b""), TypeError, "bytes-like"),
    (((b"",), 16, b"", b""), TypeError, "5 arguments"),
])
def test_bad_arguments_raise(args, error, message):
    with pytest.raises(error, match=message):
        c_digest(*args)


PURE_AND_C = """
import sys
from pstore import _blake2
from pstore.backends.base import binding_seal
from pstore.store import records
from pstore.store.signing import Signer
packed = records.pack(7, b"payload" * 30, [], 0, Signer(b"key"))
print(_blake2.digest_of is _blake2._pure_digest_of, packed.hex(), binding_seal("k\\udc80", 9).hex())
"""


@needs_c
def test_pstore_pure_python_uses_hashlib_with_the_same_bytes():
    outputs = {}
    for pure in ("", "1"):
        env = {**os.environ, "PSTORE_PURE_PYTHON": pure, "PYTHONPATH": REPO}
        result = subprocess.run([sys.executable, "-c", PURE_AND_C], capture_output=True,
                                text=True, env=env, timeout=60, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[pure] = result.stdout.split()
    assert outputs[""][0] == "False" and outputs["1"][0] == "True"
    assert outputs[""][1:] == outputs["1"][1:]


def test_the_record_trailer_and_seal_are_the_documented_hashes():
    # docs/format.md: digest = BLAKE2b-16(person "pstore-record", salt oid + version) of
    # everything before it; MAC = the same keyed with the signer's key, person "pstore-mac".
    signer = Signer(b"a key")
    body = b"\xff" + b"x" * 50
    record = records.seal(12, body, signer)
    salt = (12).to_bytes(8, "little") + bytes([records.DIGEST_FORMAT_VERSION])
    checked = body + signer.fingerprint
    digest = _hashlib(checked, 16, b"", salt, b"pstore-record")
    mac = _hashlib(checked + digest, 16, signer.mac_key, salt, b"pstore-mac")
    assert record == checked + digest + mac
    assert binding_seal("clé", 5) == _hashlib((5).to_bytes(8, "little") + "clé".encode(), 8,
                                              b"", b"", b"pstore-key")
