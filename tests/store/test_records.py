"""The record envelope (pstore.store.records) and the bounded codecs under it (blobio)."""

from __future__ import annotations

import itertools
import lzma
import pickle
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pstore.backends.blobs import BLAKE2B_TREE, BLAKE3, name_of_digest
from pstore.store import blobio, records
from pstore.store.records import BlobRef
from pstore.store.signing import Signer

ALICE, BOB = Signer(b"a" * 32), Signer(b"b" * 32)

blob_names = st.builds(name_of_digest, st.sampled_from([BLAKE2B_TREE, BLAKE3]),
                       st.binary(min_size=32, max_size=32))
blob_refs = st.builds(BlobRef, blob_names, st.integers(0, 2**64 - 1),
                      st.sampled_from([0, 1, 2, 3]))
oids = st.integers(1, 2**63 - 1)
codecs = st.sampled_from([0, 1, 2, 3])


@settings(max_examples=200, deadline=None)
@given(oid=oids, payload=st.binary(max_size=3000), blobs=st.lists(blob_refs, max_size=4),
       codec=codecs)
def test_unpack_returns_what_pack_was_given(oid, payload, blobs, codec):
    data = records.pack(oid, payload, blobs, codec, ALICE)
    assert data[:1] == records.ENVELOPE
    assert records.unpack(data, oid, signer=ALICE) == (payload, blobs, True, True)
    # Read by another key, or by none: verified by its digest, not signed.
    assert records.unpack(data, oid, signer=BOB) == (payload, blobs, True, False)
    assert records.unpack(data, oid) == (payload, blobs, True, False)


@settings(max_examples=200, deadline=None)
@given(oid=oids, payload=st.binary(max_size=600), blobs=st.lists(blob_refs, max_size=2),
       codec=codecs, data=st.data())
def test_any_changed_byte_or_truncation_is_refused(oid, payload, blobs, codec, data):
    packed = records.pack(oid, payload, blobs, codec, ALICE)
    position = data.draw(st.integers(0, len(packed) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = bytearray(packed)
    damaged[position] ^= flip
    # Its signer checks every byte (the MAC covers the digest); another reader every byte
    # but the MAC's, which only the key can check, and which the value does not depend on.
    in_mac = position >= len(packed) - records.MAC_SIZE
    for reader in (ALICE,) if in_mac else (ALICE, BOB, None):
        with pytest.raises(ValueError):
            records.unpack(bytes(damaged), oid, signer=reader)
    for reader in (ALICE, BOB, None):
        with pytest.raises(ValueError):
            records.unpack(packed[:position], oid, signer=reader)


@given(oid=oids, other=oids, payload=st.binary(max_size=100))
def test_a_record_read_under_another_object_id_or_forged_is_refused(oid, other, payload):
    packed = records.pack(oid, payload, [], 0, ALICE)
    if other != oid:
        for reader in (ALICE, BOB):
            with pytest.raises(records.IntegrityMismatch, match="digest|MAC"):
                records.unpack(packed, other, signer=reader)
    # A forger without the key recomputes the digest, keeps the fingerprint: the MAC fails.
    body = packed[:-records.TRAILER_SIZE]
    digest = records._digest(oid, (body + ALICE.fingerprint,))
    forged = body + ALICE.fingerprint + digest + bytes(records.MAC_SIZE)
    assert records.unpack(forged, oid, signer=BOB).verified     # BOB sees a valid digest
    with pytest.raises(records.IntegrityMismatch, match="MAC"):
        records.unpack(forged, oid, signer=ALICE)
    # Sealed as unsigned (or by BOB), it is simply not ALICE's.
    assert not records.unpack(records.seal(oid, body), oid, signer=ALICE).signed
    assert not records.unpack(records.seal(oid, body, BOB), oid, signer=ALICE).signed
    assert records.unpack(records.seal(oid, body, BOB), oid, signer=BOB).signed


@given(oid=oids, payload=st.binary(max_size=700), codec=codecs)
def test_sign_re_signs_a_record_and_wraps_a_format_2_one(oid, payload, codec):
    theirs = records.pack(oid, payload, [], codec, BOB)
    mine = records.sign(theirs, oid, ALICE)
    assert records.unpack(mine, oid, signer=ALICE) == (payload, [], True, True)
    plain = pickle.dumps(payload)
    wrapped = records.sign(plain, oid, ALICE, digest_required=False)
    assert records.unpack(wrapped, oid, signer=ALICE) == (plain, [], True, True)
    damaged = bytearray(theirs)
    damaged[len(damaged) // 2] ^= 1
    with pytest.raises(ValueError):
        records.sign(bytes(damaged), oid, ALICE)


def test_compression_is_used_only_when_it_pays():
    text = b"compressible " * 100
    assert len(records.pack(1, text, [], 1)) < len(text)
    assert records.pack(1, text, [], 0)[2] == 0
    incompressible = bytes(random.Random(1).randbytes(768))
    assert records.pack(1, incompressible, [], 2)[2] == 0       # xz would make it bigger
    assert records.pack(1, b"short", [], 1)[2] == 0


def test_format_2_records_are_read_unverified_only_when_allowed():
    plain = pickle.dumps([1, 2], protocol=5)
    assert records.unpack(plain, 9, digest_required=False) == (plain, [], False, False)
    with pytest.raises(ValueError, match="no envelope"):
        records.unpack(plain, 9)
    # A version 1 envelope: no payload size, no digest; zlib payload, one blob.
    name = "ab" * 32
    old = (records._OLD_HEADER.pack(0xFF, 1, 1, 1) + records._BLOB.pack(0, 10, bytes.fromhex(name))
           + zlib.compress(plain))
    assert records.unpack(old, 9, digest_required=False) == \
        (plain, [BlobRef(name, 10, 0)], False, False)
    with pytest.raises(ValueError, match="version 1"):
        records.unpack(old, 9)


def _forged(oid: int, codec: int, count: int, declared: int, rest: bytes) -> bytes:
    body = records._HEADER.pack(0xFF, records._VERSION, codec, count, declared) + rest
    return records.seal(oid, body)


@pytest.mark.parametrize("data, message", [
    (_forged(1, 7, 0, 0, b""), "payload codec 7 is unknown"),
    (_forged(1, 0, 1, 0, records._BLOB.pack(9, 1, bytes(32))), "blob codec 9 is unknown"),
    (_forged(1, 0, 1, 0, records._BLOB.pack(0x21, 1, bytes(32))), "blob naming 2 is unknown"),
    (_forged(1, 3, 0, 10, b"not zstd"), "corrupt compressed stream"),
    (_forged(1, 3, 0, 10, blobio.compress(3, b"x" * 11)), "more than the 10 bytes"),
    (_forged(1, 3, 0, 10, blobio.compress(3, b"x" * 10)[:-2]), "ends early"),
    (_forged(1, 0, 2**32 - 1, 0, b""), "lists 4294967295 blobs"),
    (_forged(1, 0, 0, 5, b"1234"), "payload is 4 bytes, its envelope says 5"),
    (_forged(1, 1, 0, 10, b"not zlib"), "corrupt compressed stream"),
    (_forged(1, 1, 0, 10, zlib.compress(b"x" * 11)), "more than the 10 bytes"),
    (_forged(1, 1, 0, 10, zlib.compress(b"x" * 10)[:-6]), "ends early"),
    (_forged(1, 2, 0, 2**40, lzma.compress(b"")), "max_record_size"),
    (b"\xff", "truncated envelope"),
    (b"\xff\x02\x00", "truncated envelope"),
    (b"\xff\x09" + bytes(56), "an envelope of version 9"),
])
def test_malformed_envelopes_say_what_is_wrong(data, message):
    with pytest.raises(ValueError, match=message):
        records.unpack(data, 1)


@pytest.mark.parametrize("codec", [1, 2, 3])
def test_decompression_stops_just_past_the_limit(codec):
    compressor = blobio._compressor(codec)
    bomb = b"".join([compressor.compress(bytes(1 << 20)) for _ in range(64)]) + compressor.flush()
    with pytest.raises(ValueError, match="more than the 1000 bytes"):
        blobio.decompress(codec, bomb, 1000)
    assert blobio.decompress(codec, bomb, 64 << 20) == bytes(64 << 20)


@settings(max_examples=50, deadline=None)
@given(payload=st.binary(max_size=5000), codec=st.sampled_from([1, 2, 3]))
def test_decompress_inverts_compress_at_the_exact_limit(payload, codec):
    compressed = blobio.compress(codec, payload)
    assert blobio.decompress(codec, compressed, len(payload)) == payload
    if payload:
        with pytest.raises(ValueError, match="more than"):
            blobio.decompress(codec, compressed, len(payload) - 1)


def test_zstd_streams_of_the_zstandard_package_and_pstore_read_each_other():
    zstandard = pytest.importorskip("zstandard")
    data = random.Random(3).randbytes(300_000) * 3
    assert zstandard.ZstdDecompressor().decompressobj().decompress(
        blobio.compress(3, data)) == data
    assert blobio.decompress(3, zstandard.ZstdCompressor(level=19).compress(data),
                             len(data)) == data


@settings(max_examples=30, deadline=None)
@given(payload=st.binary(max_size=20_000).map(lambda b: b * 7), codec=st.sampled_from([1, 2, 3]),
       cuts=st.lists(st.integers(0, 1 << 16), max_size=8))
def test_a_stream_decompresses_the_same_in_any_chunks(payload, codec, cuts):
    compressed = blobio.compress(codec, payload)
    bounds = sorted({0, len(compressed), *(cut % (len(compressed) + 1) for cut in cuts)})
    chunks = [compressed[a:b] for a, b in itertools.pairwise(bounds)]
    assert bytes(blobio._decompressed(codec, iter(chunks), len(payload))) == payload
