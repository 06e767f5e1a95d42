"""pstore._blake2: the C one-shot BLAKE2b against hashlib's, and its pure fallback; the C
check of a record's envelope against records.unpack's Python reading."""

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
from pstore.backends.base import _python_binding_seal, binding_seal
from pstore.store import records
from pstore.store.signing import Signer

try:
    from pstore._blake2_speedups import digest as c_digest
    from pstore._blake2_speedups import key_seal, open_envelope, seal_plain
except ImportError:     # built without a compiler: the pure path is all there is
    c_digest = key_seal = open_envelope = seal_plain = None

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
from pstore.backends.base import _python_binding_seal, binding_seal
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


# -- open_envelope: the common record's envelope checked in one C call --------------------

SIGNERS = [Signer(b"reader's key"), Signer(b"another key"), None]


def python_unpack(data, oid, signer):
    """What records.unpack says without the C path: (payload, signed), or the error."""
    c_path, records.open_envelope = records.open_envelope, None
    try:
        unpacked = records.unpack(data, oid, signer=signer)
        return unpacked.payload, unpacked.signed
    except ValueError as error:
        return type(error)
    finally:
        records.open_envelope = c_path


@needs_c
@given(payload=st.binary(max_size=600), oid=st.integers(1, 2**64 - 1),
       writer=st.sampled_from(SIGNERS), reader=st.sampled_from(SIGNERS),
       damage=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(1, 255))),
       cut=st.one_of(st.none(), st.integers(0, 700)), read_as=st.sampled_from([0, 1, -1]))
def test_open_envelope_agrees_with_the_python_reading(payload, oid, writer, reader, damage,
                                                      cut, read_as):
    # Records of any size, by any signer, read by any reader: intact, with a byte changed,
    # truncated, or read under a neighbouring id. C answers only when every check passes,
    # and then as the Python reading does; whatever it declines, Python reads or refuses.
    data = records.pack(oid, payload, [], 0, writer)
    if damage is not None:
        at, flip = damage
        data = bytearray(data)
        data[at % len(data)] ^= flip
        data = bytes(data)
    if cut is not None:
        data = data[:cut]
    read_oid = oid + read_as if 0 < oid + read_as < 2**64 else oid
    expected = python_unpack(data, read_oid, reader)
    fingerprint = None if reader is None else reader.fingerprint
    opened = open_envelope(data, read_oid, fingerprint, b"" if reader is None else reader.mac_key)
    if opened is not None:
        assert opened == expected
    intact = damage is None and cut is None and read_as == 0
    if intact:
        assert opened == (payload, writer is not None and writer is reader)
    with_c = records.unpack(data, read_oid, signer=reader) if opened is not None else None
    assert with_c is None or (with_c.payload, with_c.signed) == expected


@needs_c
def test_open_envelope_declines_all_but_the_plain_form():
    signer = SIGNERS[0]
    compressed = records.pack(3, b"z" * 5000, [], 1, signer)       # zlib: smaller
    with_blob = records.pack(3, b"p", [records.BlobRef("0" * 64, 10, 0)], 0, signer)
    for data in (compressed, with_blob, b"\x80\x05K\x01.", b"", b"\xff"):
        assert open_envelope(data, 3, signer.fingerprint, signer.mac_key) is None
    plain = records.pack(3, b"p", [], 0, signer)
    for bad in ((bytearray(plain), 3), (plain, -3), (plain, 2**70), (plain, "3")):
        assert open_envelope(*bad, signer.fingerprint, signer.mac_key) is None
    assert open_envelope(plain, 3, b"short", signer.mac_key) is None
    assert open_envelope(plain, 3, signer.fingerprint, b"k" * 65) is None
    with pytest.raises(TypeError, match="takes 4 arguments"):
        open_envelope(plain, 3)


@needs_c
def test_common_opener_is_open_envelope_bound_to_a_reader() -> None:
    if records.open_envelope is None:
        pytest.skip("PSTORE_PURE_PYTHON is set: records read without C")
    reader, other = SIGNERS[0], SIGNERS[1]
    open_common = records.common_opener(reader)
    assert open_common is not None
    mine, theirs = records.pack(5, b"p", [], 0, reader), records.pack(5, b"q", [], 0, other)
    assert open_common(mine, 5) == (b"p", True)
    assert open_common(theirs, 5) == (b"q", False)     # verified by its digest, not signed
    assert open_common(mine, 6) is None                 # then unpack says what is wrong
    c_path, records.open_envelope = records.open_envelope, None
    try:
        assert records.common_opener(reader) is None    # pure Python: unpack does it all
    finally:
        records.open_envelope = c_path


# -- seal_plain: the common record written in one C call ----------------------------------

def python_pack(payload, oid, signer, codec=0):
    c_path, records.seal_plain = records.seal_plain, None
    try:
        return records.pack(oid, payload, [], codec, signer)
    finally:
        records.seal_plain = c_path


@needs_c
@given(payload=st.binary(max_size=3000), oid=st.integers(0, 2**64 - 1),
       signer=st.sampled_from(SIGNERS), codec=st.sampled_from([0, 1, 2]))
def test_seal_plain_writes_the_bytes_of_the_python_pack(payload, oid, signer, codec):
    expected = python_pack(payload, oid, signer, codec)
    assert records.pack(oid, payload, [], codec, signer) == expected
    if codec == 0 or len(payload) < 512:     # the form seal_plain writes
        fingerprint = None if signer is None else signer.fingerprint
        assert seal_plain(payload, oid, fingerprint, b"" if signer is None else
                          signer.mac_key) == expected
    # and it reads back, by C and by Python
    assert records.unpack(expected, oid, signer=signer).payload == payload


@needs_c
def test_seal_plain_refuses_what_is_not_a_record() -> None:
    signer = SIGNERS[0]
    with pytest.raises(TypeError, match="payload must be bytes"):
        seal_plain(bytearray(b"p"), 1, None, b"")
    with pytest.raises(OverflowError):
        seal_plain(b"p", -1, None, b"")
    with pytest.raises(ValueError, match="8-byte fingerprint"):
        seal_plain(b"p", 1, b"short", signer.mac_key)
    with pytest.raises(ValueError, match="key of at most 64 bytes"):
        seal_plain(b"p", 1, signer.fingerprint, b"k" * 65)
    with pytest.raises(TypeError, match="takes 4 arguments"):
        seal_plain(b"p", 1)


@needs_c
@given(key=st.one_of(st.text(), st.text(st.sampled_from(["a", "é", "\ud800", "\udfff", "😀"]))),
       oid=st.integers(0, 2**64 - 1))
def test_key_seal_is_the_documented_seal(key, oid):
    # Any text, lone surrogates included, and any unsigned 64-bit id.
    expected = _hashlib(oid.to_bytes(8, "little") + key.encode("utf-8", "surrogatepass"), 8,
                        b"", b"", b"pstore-key")
    assert key_seal(key, oid) == expected
    assert binding_seal(key, oid) == expected
    assert _python_binding_seal(key, oid) == expected   # what PSTORE_PURE_PYTHON=1 uses


@needs_c
def test_key_seal_refuses_what_is_not_a_binding() -> None:
    with pytest.raises(TypeError, match="key must be a str"):
        key_seal(b"k", 1)
    with pytest.raises(OverflowError):
        key_seal("k", -1)
    with pytest.raises(OverflowError):
        key_seal("k", 2**64)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        key_seal("k")
