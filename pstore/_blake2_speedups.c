/* One-shot BLAKE2b (RFC 7693) over several buffers, for the hashes pstore makes per record
 * and per key binding: a record's digest and MAC, a binding's seal. And, since a get checks
 * one, open_envelope: the parse and check of the common record's envelope in one call.
 *
 * hashlib's blake2b is the same function; what this saves is its per-call cost (keyword
 * parsing, an object per hasher, one call per update), which for a record of a hundred
 * bytes is most of the time. pstore._blake2.digest_of is the one caller; without this
 * module (no compiler, or PSTORE_PURE_PYTHON) it uses hashlib, with the same results
 * (tests/test_blake2.py compares them).
 *
 * Written from RFC 7693: the state is eight 64-bit words, started from SHA-512's initial
 * values xored with the parameter block (digest length, key length, salt, personalization);
 * a key is hashed as a first block of its own, zero-padded; every 128-byte block is mixed
 * in by twelve rounds of G, the last one flagged final.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 128
#define MAX_DIGEST 64
#define MAX_KEY 64
#define PARAM_BYTES 16  /* the salt's and the personalization's length */

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
    0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
    0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

/* The message word order of each round; rounds 10 and 11 take rows 0 and 1 again. */
static const uint8_t SIGMA[10][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
};

typedef struct {
    uint64_t h[8];
    uint64_t counter;           /* bytes hashed so far (2^64 is far beyond any record) */
    uint8_t block[BLOCK];       /* bytes not yet compressed */
    size_t filled;
} State;

static uint64_t load64(const uint8_t *p) {
    uint64_t value = 0;
    for (int i = 7; i >= 0; i--)
        value = (value << 8) | p[i];
    return value;
}

static uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

#define G(a, b, c, d, x, y)                          \
    do {                                             \
        v[a] = v[a] + v[b] + (x); v[d] = rotr(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];       v[b] = rotr(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + (y); v[d] = rotr(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];       v[b] = rotr(v[b] ^ v[c], 63); \
    } while (0)

static void compress(State *s, const uint8_t *block, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++)
        m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= s->counter;        /* the counter's high word is always 0 here */
    if (last)
        v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const uint8_t *o = SIGMA[r % 10];
        G(0, 4, 8, 12, m[o[0]], m[o[1]]);
        G(1, 5, 9, 13, m[o[2]], m[o[3]]);
        G(2, 6, 10, 14, m[o[4]], m[o[5]]);
        G(3, 7, 11, 15, m[o[6]], m[o[7]]);
        G(0, 5, 10, 15, m[o[8]], m[o[9]]);
        G(1, 6, 11, 12, m[o[10]], m[o[11]]);
        G(2, 7, 8, 13, m[o[12]], m[o[13]]);
        G(3, 4, 9, 14, m[o[14]], m[o[15]]);
    }
    for (int i = 0; i < 8; i++)
        s->h[i] ^= v[i] ^ v[i + 8];
}

/* Add bytes; a full block is compressed only once more bytes follow (the last block,
 * full or not, is compressed by finish with the final flag). */
static void update(State *s, const uint8_t *data, size_t size) {
    while (size) {
        if (s->filled == BLOCK) {
            s->counter += BLOCK;
            compress(s, s->block, 0);
            s->filled = 0;
        }
        if (s->filled == 0) {
            while (size > BLOCK) {      /* whole blocks straight from the caller's bytes */
                s->counter += BLOCK;
                compress(s, data, 0);
                data += BLOCK;
                size -= BLOCK;
            }
        }
        size_t take = BLOCK - s->filled;
        if (take > size)
            take = size;
        memcpy(s->block + s->filled, data, take);
        s->filled += take;
        data += take;
        size -= take;
    }
}

static void start(State *s, size_t digest_size, const uint8_t *key, size_t key_size,
                  const uint8_t *salt, const uint8_t *person) {
    memcpy(s->h, IV, sizeof IV);
    s->h[0] ^= 0x01010000ULL ^ ((uint64_t)key_size << 8) ^ (uint64_t)digest_size;
    s->h[4] ^= load64(salt);
    s->h[5] ^= load64(salt + 8);
    s->h[6] ^= load64(person);
    s->h[7] ^= load64(person + 8);
    s->counter = 0;
    s->filled = 0;
    if (key_size) {
        uint8_t padded[BLOCK] = {0};
        memcpy(padded, key, key_size);
        update(s, padded, BLOCK);
    }
}

static void finish(State *s, uint8_t *out, size_t digest_size) {
    s->counter += s->filled;
    memset(s->block + s->filled, 0, BLOCK - s->filled);
    compress(s, s->block, 1);
    uint8_t all[64];
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++)
            all[8 * i + j] = (uint8_t)(s->h[i] >> (8 * j));
    memcpy(out, all, digest_size);
}

/* A bytes-like parameter of at most `limit` bytes, copied zero-padded into `out`. */
static int small_param(PyObject *value, const char *what, size_t limit, uint8_t *out,
                       size_t *size) {
    Py_buffer view;
    if (PyObject_GetBuffer(value, &view, PyBUF_SIMPLE) < 0)
        return -1;
    if ((size_t)view.len > limit) {
        PyErr_Format(PyExc_ValueError, "maximum %s length is %zu bytes", what, limit);
        PyBuffer_Release(&view);
        return -1;
    }
    memset(out, 0, limit);
    memcpy(out, view.buf, view.len);
    *size = (size_t)view.len;
    PyBuffer_Release(&view);
    return 0;
}

PyDoc_STRVAR(digest_doc,
"digest(parts, digest_size, key, salt, person) -> bytes\n\n"
"BLAKE2b of the bytes-like objects of tuple ``parts`` joined, as hashlib.blake2b(\n"
"digest_size=..., key=..., salt=..., person=...) gives it.");

static PyObject *digest(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "digest() takes 5 arguments");
        return NULL;
    }
    PyObject *parts = args[0];
    if (!PyTuple_Check(parts)) {
        PyErr_SetString(PyExc_TypeError, "digest() parts must be a tuple");
        return NULL;
    }
    Py_ssize_t digest_size = PyLong_AsSsize_t(args[1]);
    if (digest_size == -1 && PyErr_Occurred())
        return NULL;
    if (digest_size < 1 || digest_size > MAX_DIGEST) {
        PyErr_Format(PyExc_ValueError, "digest_size must be between 1 and %d bytes", MAX_DIGEST);
        return NULL;
    }
    uint8_t key[MAX_KEY], salt[PARAM_BYTES], person[PARAM_BYTES];
    size_t key_size, unused;
    if (small_param(args[2], "key", MAX_KEY, key, &key_size) < 0 ||
        small_param(args[3], "salt", PARAM_BYTES, salt, &unused) < 0 ||
        small_param(args[4], "person", PARAM_BYTES, person, &unused) < 0)
        return NULL;
    State state;
    start(&state, (size_t)digest_size, key, key_size, salt, person);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(parts); i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(parts, i), &view, PyBUF_SIMPLE) < 0)
            return NULL;
        update(&state, (const uint8_t *)view.buf, (size_t)view.len);
        PyBuffer_Release(&view);
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, digest_size);
    if (result != NULL)
        finish(&state, (uint8_t *)PyBytes_AS_STRING(result), (size_t)digest_size);
    return result;
}

/* The envelope of a record (docs/format.md, "Record envelopes"; pstore/store/records.py
 * writes and reads every form): here only the common one, version 3 with no codec and no
 * blobs, whose every check passes. */
#define ENVELOPE_HEADER 15      /* 0xFF, version, codec, 4 bytes of blobs, 8 of size */
#define FINGERPRINT 8
#define RECORD_DIGEST 16
#define RECORD_MAC 16
#define TRAILER (FINGERPRINT + RECORD_DIGEST + RECORD_MAC)
#define ENVELOPE_VERSION 3
#define DIGEST_FORMAT_VERSION 3 /* the salt's last byte */

/* The 16-byte BLAKE2b of data[0:size] salted with `salt`, keyed with `key` (key_size 0:
 * none) and personalized with `person_text`, written to `out`. */
static void record_hash(const uint8_t *data, size_t size, const uint8_t *salt,
                        const uint8_t *key, size_t key_size, const char *person_text,
                        uint8_t *out) {
    uint8_t person[PARAM_BYTES] = {0};
    memcpy(person, person_text, strlen(person_text));
    State state;
    start(&state, RECORD_DIGEST, key, key_size, salt, person);
    update(&state, data, size);
    finish(&state, out, RECORD_DIGEST);
}

/* Whether the 16-byte BLAKE2b of data[0:size], salted with the record's id, keyed with
 * `key` (key_size 0: none) and personalized with `person`, equals `expected`. */
static int hash_matches(const uint8_t *data, size_t size, const uint8_t *salt,
                        const uint8_t *key, size_t key_size, const char *person_text,
                        const uint8_t *expected) {
    uint8_t out[RECORD_DIGEST];
    record_hash(data, size, salt, key, key_size, person_text, out);
    uint8_t differ = 0;     /* compared in constant time, as hmac.compare_digest does */
    for (int i = 0; i < RECORD_DIGEST; i++)
        differ |= out[i] ^ expected[i];
    return differ == 0;
}

PyDoc_STRVAR(open_envelope_doc,
"open_envelope(data, oid, fingerprint, mac_key) -> (payload, signed) or None\n\n"
"The payload of record ``oid`` (bytes ``data``) when it is an envelope of version 3\n"
"with no codec and no blobs whose declared size, and MAC (its fingerprint is\n"
"``fingerprint``: then ``signed`` is True) or digest (any other), match; None for\n"
"every other record, which records.unpack then reads, and refuses, itself.");

static PyObject *open_envelope(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "open_envelope() takes 4 arguments");
        return NULL;
    }
    PyObject *record = args[0];
    if (!PyBytes_Check(record) || !PyLong_Check(args[1]))
        Py_RETURN_NONE;
    const uint8_t *data = (const uint8_t *)PyBytes_AS_STRING(record);
    Py_ssize_t size = PyBytes_GET_SIZE(record);
    if (size < ENVELOPE_HEADER + TRAILER || data[0] != 0xFF || data[1] != ENVELOPE_VERSION
            || data[2] != 0 || (data[3] | data[4] | data[5] | data[6]) != 0)
        Py_RETURN_NONE;
    Py_ssize_t end = size - TRAILER;    /* where the payload ends */
    if (load64(data + 7) != (uint64_t)(end - ENVELOPE_HEADER))
        Py_RETURN_NONE;
    uint64_t oid = PyLong_AsUnsignedLongLong(args[1]);
    if (oid == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();      /* no id of a record: unpack says what is wrong */
        Py_RETURN_NONE;
    }
    uint8_t salt[PARAM_BYTES] = {0};
    for (int i = 0; i < 8; i++)
        salt[i] = (uint8_t)(oid >> (8 * i));
    salt[8] = DIGEST_FORMAT_VERSION;
    const uint8_t *fingerprint = data + end;
    int signed_by_reader = 0;
    if (args[2] != Py_None) {
        if (!PyBytes_Check(args[2]) || !PyBytes_Check(args[3])
                || PyBytes_GET_SIZE(args[2]) != FINGERPRINT
                || PyBytes_GET_SIZE(args[3]) > MAX_KEY)
            Py_RETURN_NONE;
        signed_by_reader = memcmp(PyBytes_AS_STRING(args[2]), fingerprint, FINGERPRINT) == 0;
    }
    int matches;
    if (signed_by_reader) {
        uint8_t key[MAX_KEY] = {0};
        size_t key_size = (size_t)PyBytes_GET_SIZE(args[3]);
        memcpy(key, PyBytes_AS_STRING(args[3]), key_size);
        matches = hash_matches(data, (size_t)(size - RECORD_MAC), salt, key, key_size,
                               "pstore-mac", data + size - RECORD_MAC);
    } else {
        matches = hash_matches(data, (size_t)(end + FINGERPRINT), salt, NULL, 0,
                               "pstore-record", data + end + FINGERPRINT);
    }
    if (!matches)
        Py_RETURN_NONE;
    PyObject *payload = PyBytes_FromStringAndSize((const char *)data + ENVELOPE_HEADER,
                                                  end - ENVELOPE_HEADER);
    if (payload == NULL)
        return NULL;
    return Py_BuildValue("(NO)", payload, signed_by_reader ? Py_True : Py_False);
}

PyDoc_STRVAR(seal_plain_doc,
"seal_plain(payload, oid, fingerprint, mac_key) -> bytes\n\n"
"The record of object id ``oid`` holding bytes ``payload`` in the common envelope,\n"
"version 3 with no codec and no blobs: header, payload and trailer, signed with\n"
"``mac_key`` under ``fingerprint``, or unsigned (zero fingerprint and MAC) when\n"
"``fingerprint`` is None; the bytes records.pack writes for it.");

static PyObject *seal_plain(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "seal_plain() takes 4 arguments");
        return NULL;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "seal_plain() payload must be bytes");
        return NULL;
    }
    uint64_t oid = PyLong_AsUnsignedLongLong(args[1]);
    if (oid == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    int is_signed = args[2] != Py_None;
    if (is_signed && (!PyBytes_Check(args[2]) || PyBytes_GET_SIZE(args[2]) != FINGERPRINT
                      || !PyBytes_Check(args[3]) || PyBytes_GET_SIZE(args[3]) > MAX_KEY)) {
        PyErr_Format(PyExc_ValueError, "seal_plain() needs a %d-byte fingerprint and a key "
                     "of at most %d bytes", FINGERPRINT, MAX_KEY);
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    if (size > PY_SSIZE_T_MAX - ENVELOPE_HEADER - TRAILER)
        return PyErr_NoMemory();
    PyObject *record = PyBytes_FromStringAndSize(NULL, ENVELOPE_HEADER + size + TRAILER);
    if (record == NULL)
        return NULL;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(record);
    memset(out, 0, ENVELOPE_HEADER);
    out[0] = 0xFF;
    out[1] = ENVELOPE_VERSION;
    for (int i = 0; i < 8; i++)
        out[7 + i] = (uint8_t)((uint64_t)size >> (8 * i));
    memcpy(out + ENVELOPE_HEADER, PyBytes_AS_STRING(args[0]), (size_t)size);
    uint8_t *trailer = out + ENVELOPE_HEADER + size;
    uint8_t salt[PARAM_BYTES] = {0};
    for (int i = 0; i < 8; i++)
        salt[i] = (uint8_t)(oid >> (8 * i));
    salt[8] = DIGEST_FORMAT_VERSION;
    if (is_signed)
        memcpy(trailer, PyBytes_AS_STRING(args[2]), FINGERPRINT);
    else
        memset(trailer, 0, FINGERPRINT);
    /* The digest covers all before it, the fingerprint included; the MAC all before it. */
    record_hash(out, (size_t)(trailer + FINGERPRINT - out), salt, NULL, 0, "pstore-record",
                trailer + FINGERPRINT);
    if (is_signed) {
        uint8_t key[MAX_KEY] = {0};
        size_t key_size = (size_t)PyBytes_GET_SIZE(args[3]);
        memcpy(key, PyBytes_AS_STRING(args[3]), key_size);
        record_hash(out, (size_t)(trailer + FINGERPRINT + RECORD_DIGEST - out), salt, key,
                    key_size, "pstore-mac", trailer + FINGERPRINT + RECORD_DIGEST);
    } else {
        memset(trailer + FINGERPRINT + RECORD_DIGEST, 0, RECORD_MAC);
    }
    return record;
}

PyDoc_STRVAR(key_seal_doc,
"key_seal(key, oid) -> bytes\n\n"
"The 8-byte seal of the binding of str ``key`` to object id ``oid`` (an unsigned 64-bit\n"
"integer): BLAKE2b personalized ``pstore-key`` of the id as 8 little-endian bytes and the\n"
"key in UTF-8, lone surrogates allowed; what pstore.backends.base.binding_seal gives.");

#define KEY_SEAL 8

static PyObject *key_seal(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "key_seal() takes 2 arguments");
        return NULL;
    }
    if (!PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "key_seal() key must be a str");
        return NULL;
    }
    uint64_t oid = PyLong_AsUnsignedLongLong(args[1]);
    if (oid == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    /* The str's own UTF-8 (cached in it) where it has one; a key with lone surrogates
     * has none, and is encoded with surrogatepass. */
    PyObject *encoded = NULL;
    Py_ssize_t size;
    const char *text = PyUnicode_AsUTF8AndSize(args[0], &size);
    if (text == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return NULL;
        PyErr_Clear();
        encoded = PyUnicode_AsEncodedString(args[0], "utf-8", "surrogatepass");
        if (encoded == NULL)
            return NULL;
        text = PyBytes_AS_STRING(encoded);
        size = PyBytes_GET_SIZE(encoded);
    }
    uint8_t id[8], salt[PARAM_BYTES] = {0}, person[PARAM_BYTES] = {0};
    for (int i = 0; i < 8; i++)
        id[i] = (uint8_t)(oid >> (8 * i));
    memcpy(person, "pstore-key", strlen("pstore-key"));
    State state;
    start(&state, KEY_SEAL, NULL, 0, salt, person);
    update(&state, id, sizeof id);
    update(&state, (const uint8_t *)text, (size_t)size);
    Py_XDECREF(encoded);
    PyObject *result = PyBytes_FromStringAndSize(NULL, KEY_SEAL);
    if (result != NULL)
        finish(&state, (uint8_t *)PyBytes_AS_STRING(result), KEY_SEAL);
    return result;
}

static PyMethodDef methods[] = {
    {"digest", (PyCFunction)(void (*)(void))digest, METH_FASTCALL, digest_doc},
    {"open_envelope", (PyCFunction)(void (*)(void))open_envelope, METH_FASTCALL,
     open_envelope_doc},
    {"seal_plain", (PyCFunction)(void (*)(void))seal_plain, METH_FASTCALL, seal_plain_doc},
    {"key_seal", (PyCFunction)(void (*)(void))key_seal, METH_FASTCALL, key_seal_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "pstore._blake2_speedups",
    "One-shot BLAKE2b over several buffers, the common record's envelope, checked and "
    "written, and key bindings' seals (see pstore._blake2).", -1, methods,
};

PyMODINIT_FUNC PyInit__blake2_speedups(void) { return PyModule_Create(&module_def); }
