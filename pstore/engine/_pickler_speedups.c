/* pstore.engine._pickler_speedups: the pickler's fast path for plain data, in C.
 *
 * A Saver is made by the pure-Python pickler (pickler._make_dump) for one set of hooks
 * and shares that pickler's state: the bytearray holding the current frame, the memo
 * dict (id(obj) -> (index, obj)), the protocol and the persistent-id settings. Its
 * save(obj) and save_each(objects, pid_allowed=True) take the place of the Python
 * functions of the same names, for the binary protocols (1 to 5) outside fast mode.
 *
 * It writes what it owns -- exact None, bool, int, float, str, bytes, bytearray, dict,
 * list and tuple -- with the opcodes, memo entries, frame ends and batches the Python
 * pickler writes, so the bytes are the same. Everything else goes back to Python, and C
 * resumes after it:
 *
 *   - an object of any other type (a subclass too) goes to save_other(obj), the Python
 *     pickler's own treatment of one object: persistent_id, memo, reducer_override,
 *     globals, the reduce protocol, every error message;
 *   - where a persistent id may exist, C calls persistent_id(obj) (the hook itself) and
 *     hands a non-None answer to the Python save_persistent_id(pid);
 *   - the rare forms of owned types (strings and bytes of a frame's size or more, which
 *     go outside the frame; ints beyond 64 bits; bytes below protocol 3, bytearrays
 *     below 5, which are reductions) go to the Python saver of that type after C has
 *     asked for the persistent id and looked in the memo, as the Python loop does;
 *   - a full frame is ended by the Python end_frame().
 *
 * Python code can run under any of these calls and change what C is pickling (a hook
 * that empties a list being saved, clears the memo, ...). So C holds a reference of its
 * own to every object it uses across a call, reads list sizes again after each item
 * (as the stdlib's C pickler does) and raises the stdlib's RuntimeError when a dict
 * changed size; it never keeps a pointer into a container across a call.
 *
 * Opcode bytes and the batch and frame sizes are not written here: configure()
 * receives them from opcodes.py, the one table of the engine.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if PY_VERSION_HEX < 0x030B0000
#define PyFloat_Pack8(x, p, le) _PyFloat_Pack8((x), (unsigned char *)(p), (le))
#endif

/* -- configuration: opcode bytes and sizes, from opcodes.py ------------------------------ */

enum op {
    OP_MARK, OP_STOP, OP_POP, OP_POP_MARK, OP_NONE, OP_NEWTRUE, OP_NEWFALSE,
    OP_BININT, OP_BININT1, OP_BININT2, OP_LONG1, OP_BINFLOAT,
    OP_SHORT_BINUNICODE, OP_BINUNICODE, OP_SHORT_BINBYTES, OP_BINBYTES, OP_BYTEARRAY8,
    OP_EMPTY_LIST, OP_EMPTY_DICT, OP_EMPTY_TUPLE, OP_TUPLE, OP_TUPLE1, OP_TUPLE2, OP_TUPLE3,
    OP_APPEND, OP_APPENDS, OP_SETITEM, OP_SETITEMS,
    OP_MEMOIZE, OP_BINPUT, OP_LONG_BINPUT, OP_BINGET, OP_LONG_BINGET,
    OP_COUNT
};

static const char *const op_names[OP_COUNT] = {
    "MARK", "STOP", "POP", "POP_MARK", "NONE", "NEWTRUE", "NEWFALSE",
    "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT",
    "SHORT_BINUNICODE", "BINUNICODE", "SHORT_BINBYTES", "BINBYTES", "BYTEARRAY8",
    "EMPTY_LIST", "EMPTY_DICT", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "APPEND", "APPENDS", "SETITEM", "SETITEMS",
    "MEMOIZE", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET",
};

static char ops[OP_COUNT];
static int configured = 0;
static Py_ssize_t batch_size = 1000;
static Py_ssize_t frame_size_target = 64 * 1024;

/* -- the Memo: id(obj) -> (index, obj), as a table of pointers ----------------------------- */

/* The pickler's memo. To Python it is a mapping from id(obj) to (memo index, obj), like
 * the dict the pure-Python pickler uses; C finds and adds entries by the object's address
 * with no Python object made. An open-addressing table (linear probing, at most half
 * full) of (object, index) pairs; each entry holds a reference to its object, so that
 * its address is not reused while it is in the memo. */

typedef struct {
    PyObject *obj;          /* NULL: an empty slot */
    Py_ssize_t index;
} MemoEntry;

typedef struct {
    PyObject_HEAD
    MemoEntry *table;
    size_t mask;            /* table size - 1; the size is a power of 2 */
    Py_ssize_t count;
} Memo;

static PyTypeObject MemoType;

#define MEMO_MIN_SIZE 64
#define MEMO_KEPT_SIZE 65536     /* slots: 1 MiB */

static inline size_t
memo_slot(const Memo *m, const void *obj)
{
    /* Fibonacci hashing: the multiplication moves the address's varying bits up (its
     * low bits are alignment zeros), and the top bits pick the slot. */
    uint64_t h = (uint64_t)(uintptr_t)obj * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 32) & m->mask;
}

/* The entry of obj, or NULL. */
static inline MemoEntry *
memo_find(const Memo *m, const PyObject *obj)
{
    size_t i = memo_slot(m, obj);
    for (;;) {
        MemoEntry *entry = &m->table[i];
        if (entry->obj == obj)
            return entry;
        if (entry->obj == NULL)
            return NULL;
        i = (i + 1) & m->mask;
    }
}

static int
memo_resize(Memo *m, size_t size)
{
    MemoEntry *table = PyMem_Calloc(size, sizeof(MemoEntry));
    if (table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    MemoEntry *old = m->table;
    size_t old_size = old == NULL ? 0 : m->mask + 1;
    m->table = table;
    m->mask = size - 1;
    for (size_t i = 0; i < old_size; i++) {
        if (old[i].obj != NULL) {
            size_t j = memo_slot(m, old[i].obj);
            while (table[j].obj != NULL)
                j = (j + 1) & m->mask;
            table[j] = old[i];
        }
    }
    PyMem_Free(old);
    return 0;
}

/* Enter obj at index (replacing an entry of the same object). */
static int
memo_set(Memo *m, PyObject *obj, Py_ssize_t index)
{
    MemoEntry *entry = memo_find(m, obj);
    if (entry != NULL) {
        entry->index = index;
        return 0;
    }
    if ((size_t)(m->count + 1) * 2 > m->mask + 1 && memo_resize(m, (m->mask + 1) * 2) < 0)
        return -1;
    size_t i = memo_slot(m, obj);
    while (m->table[i].obj != NULL)
        i = (i + 1) & m->mask;
    m->table[i].obj = Py_NewRef(obj);
    m->table[i].index = index;
    m->count++;
    return 0;
}

/* Empty the memo, dropping its references only after it is consistent again (a
 * __del__ run by a drop may use it). The new table has the old one's size up to
 * MEMO_KEPT_SIZE, so that a pickler dumping records of similar sizes (cleared after
 * each, as dumps() and the store do) does not grow its table again each time. */
static int
memo_clear(Memo *m)
{
    MemoEntry *old = m->table;
    size_t old_size = m->mask + 1;
    Py_ssize_t old_count = m->count;
    m->table = NULL;
    m->count = 0;
    if (memo_resize(m, old_size < MEMO_KEPT_SIZE ? old_size : MEMO_KEPT_SIZE) < 0) {
        m->table = old;     /* memo_resize changed nothing else */
        m->count = old_count;
        return -1;
    }
    for (size_t i = 0; i < old_size; i++)
        Py_XDECREF(old[i].obj);
    PyMem_Free(old);
    return 0;
}

/* The object an id names, for a lookup: NULL (no error) if `key` is not an int. */
static int
memo_key(PyObject *key, void **address)
{
    if (!PyLong_Check(key)) {
        *address = NULL;
        return 0;
    }
    *address = PyLong_AsVoidPtr(key);
    if (*address == NULL && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();      /* no object has that id */
    }
    return 0;
}

static PyObject *
memo_entry_tuple(const MemoEntry *entry)
{
    return Py_BuildValue("(nO)", entry->index, entry->obj);
}

/* The entry for the id `key`, or NULL with no error when there is none. */
static MemoEntry *
memo_lookup_key(Memo *m, PyObject *key, int *error)
{
    void *address;
    *error = memo_key(key, &address);
    if (*error < 0 || address == NULL)
        return NULL;
    return memo_find(m, address);
}

static PyObject *
memo_get(Memo *m, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    int error;
    MemoEntry *entry = memo_lookup_key(m, args[0], &error);
    if (error < 0)
        return NULL;
    if (entry == NULL)
        return Py_NewRef(nargs == 2 ? args[1] : Py_None);
    return memo_entry_tuple(entry);
}

static PyObject *
memo_subscript(Memo *m, PyObject *key)
{
    int error;
    MemoEntry *entry = memo_lookup_key(m, key, &error);
    if (error < 0)
        return NULL;
    if (entry == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return memo_entry_tuple(entry);
}

static int
memo_ass_subscript(Memo *m, PyObject *key, PyObject *value)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "the pickler memo does not delete entries: "
                        "clear() empties it");
        return -1;
    }
    if (!PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 2) {
        PyErr_SetString(PyExc_TypeError, "a pickler memo entry is an (index, object) tuple");
        return -1;
    }
    PyObject *obj = PyTuple_GET_ITEM(value, 1);
    Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(value, 0));
    if (index == -1 && PyErr_Occurred())
        return -1;
    PyObject *id = PyLong_FromVoidPtr(obj);
    if (id == NULL)
        return -1;
    int same = PyObject_RichCompareBool(id, key, Py_EQ);
    Py_DECREF(id);
    if (same < 0)
        return -1;
    if (!same || index < 0) {
        PyErr_SetString(PyExc_ValueError,
                        "a pickler memo entry is memo[id(obj)] = (index >= 0, obj)");
        return -1;
    }
    return memo_set(m, obj, index);
}

static Py_ssize_t
memo_length(Memo *m)
{
    return m->count;
}

static int
memo_contains(Memo *m, PyObject *key)
{
    int error;
    MemoEntry *entry = memo_lookup_key(m, key, &error);
    return error < 0 ? -1 : entry != NULL;
}

static PyObject *
memo_clear_method(Memo *m, PyObject *unused)
{
    if (memo_clear(m) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
memo_copy(Memo *m, PyObject *unused)
{
    PyObject *copy = PyDict_New();
    if (copy == NULL)
        return NULL;
    for (size_t i = 0; i <= m->mask; i++) {
        MemoEntry *entry = &m->table[i];
        if (entry->obj == NULL)
            continue;
        PyObject *key = PyLong_FromVoidPtr(entry->obj);
        PyObject *value = key == NULL ? NULL : memo_entry_tuple(entry);
        if (value == NULL || PyDict_SetItem(copy, key, value) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(value);
            Py_DECREF(copy);
            return NULL;
        }
        Py_DECREF(key);
        Py_DECREF(value);
    }
    return copy;
}

static int
memo_traverse(Memo *m, visitproc visit, void *arg)
{
    for (size_t i = 0; m->table != NULL && i <= m->mask; i++)
        Py_VISIT(m->table[i].obj);
    return 0;
}

static int
memo_tp_clear(Memo *m)
{
    return m->table == NULL ? 0 : memo_clear(m);
}

static void
memo_dealloc(Memo *m)
{
    PyObject_GC_UnTrack(m);
    MemoEntry *table = m->table;
    size_t size = table == NULL ? 0 : m->mask + 1;
    m->table = NULL;
    for (size_t i = 0; i < size; i++)
        Py_XDECREF(table[i].obj);
    PyMem_Free(table);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static PyObject *
memo_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) != 0 || (kwargs != NULL && PyDict_GET_SIZE(kwargs) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Memo() takes no arguments");
        return NULL;
    }
    Memo *m = (Memo *)type->tp_alloc(type, 0);
    if (m == NULL)
        return NULL;
    if (memo_resize(m, MEMO_MIN_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return (PyObject *)m;
}

static PyMethodDef memo_methods[] = {
    {"get", (PyCFunction)(void (*)(void))memo_get, METH_FASTCALL,
     "get(id, default=None): the (index, obj) entry of the object with this id."},
    {"clear", (PyCFunction)memo_clear_method, METH_NOARGS, "clear(): forget every entry."},
    {"copy", (PyCFunction)memo_copy, METH_NOARGS,
     "copy(): the entries as a dict {id(obj): (index, obj)}."},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods memo_as_mapping = {
    .mp_length = (lenfunc)memo_length,
    .mp_subscript = (binaryfunc)memo_subscript,
    .mp_ass_subscript = (objobjargproc)memo_ass_subscript,
};

static PySequenceMethods memo_as_sequence = {
    .sq_contains = (objobjproc)memo_contains,
};

PyDoc_STRVAR(memo_doc,
"Memo()\n\n"
"A pickler's memo: memo[id(obj)] = (index, obj), get, len, `in`, clear and copy, as a\n"
"dict would; entries are not deleted one by one.");

static PyTypeObject MemoType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pstore.engine._pickler_speedups.Memo",
    .tp_basicsize = sizeof(Memo),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = memo_doc,
    .tp_new = memo_new,
    .tp_dealloc = (destructor)memo_dealloc,
    .tp_traverse = (traverseproc)memo_traverse,
    .tp_clear = (inquiry)memo_tp_clear,
    .tp_methods = memo_methods,
    .tp_as_mapping = &memo_as_mapping,
    .tp_as_sequence = &memo_as_sequence,
};

/* -- the Saver ----------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *buf;                  /* bytearray: the current frame (or unflushed output) */
    Memo *memo;
    PyObject *persistent_id;        /* callable, or NULL when every answer is None */
    PyObject *pid_for_ids;          /* dict, or NULL (see Pickler.persistent_id_for_ids) */
    PyObject *end_frame;            /* end_frame() */
    PyObject *save_other;           /* save_other(obj): Python's treatment of one object */
    PyObject *save_persistent_id;   /* save_persistent_id(pid) */
    PyObject *save_str, *save_int, *save_bytes, *save_bytearray;   /* Python's savers */
    int proto;
    int pid_for_atoms;
} Saver;

/* Append n bytes to the bytearray. Within its allocation this is a memcpy; beyond it,
 * PyByteArray_Resize grows it (over-allocating) or raises (e.g. while it is exported). */
static inline int
put(Saver *s, const char *data, Py_ssize_t n)
{
    PyByteArrayObject *ba = (PyByteArrayObject *)s->buf;
    Py_ssize_t size = Py_SIZE(ba);
    if (ba->ob_start == ba->ob_bytes && ba->ob_exports == 0 && size + n < ba->ob_alloc) {
        memcpy(ba->ob_bytes + size, data, (size_t)n);
        Py_SET_SIZE(ba, size + n);
        ba->ob_bytes[size + n] = '\0';
        return 0;
    }
    if (PyByteArray_Resize(s->buf, size + n) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(s->buf) + size, data, (size_t)n);
    return 0;
}

static inline int
put_op(Saver *s, enum op code)
{
    return put(s, &ops[code], 1);
}

static inline void
le32(char *p, uint32_t v)
{
    p[0] = (char)(v & 0xFF); p[1] = (char)(v >> 8 & 0xFF);
    p[2] = (char)(v >> 16 & 0xFF); p[3] = (char)(v >> 24 & 0xFF);
}

static inline void
le64(char *p, uint64_t v)
{
    le32(p, (uint32_t)(v & 0xFFFFFFFFu));
    le32(p + 4, (uint32_t)(v >> 32));
}

/* BINGET/LONG_BINGET of a memo index. */
static int
put_memo_get(Saver *s, Py_ssize_t index)
{
    char out[5];
    if (index < 256) {
        out[0] = ops[OP_BINGET];
        out[1] = (char)index;
        return put(s, out, 2);
    }
    out[0] = ops[OP_LONG_BINGET];
    le32(out + 1, (uint32_t)index);
    return put(s, out, 5);
}

/* Enter obj in the memo and write MEMOIZE or BINPUT/LONG_BINPUT. */
static int
memo_put(Saver *s, PyObject *obj)
{
    Py_ssize_t index = s->memo->count;
    if (memo_set(s->memo, obj, index) < 0)
        return -1;
    if (s->proto >= 4)
        return put_op(s, OP_MEMOIZE);
    char out[5];
    if (index < 256) {
        out[0] = ops[OP_BINPUT];
        out[1] = (char)index;
        return put(s, out, 2);
    }
    out[0] = ops[OP_LONG_BINPUT];
    le32(out + 1, (uint32_t)index);
    return put(s, out, 5);
}

/* The memo index of obj, or -1. */
static inline Py_ssize_t
memo_index(Saver *s, PyObject *obj)
{
    MemoEntry *entry = memo_find(s->memo, obj);
    return entry == NULL ? -1 : entry->index;
}

static int
call1(PyObject *func, PyObject *arg)
{
    PyObject *result = PyObject_CallOneArg(func, arg);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* What C does with each type. */
enum kind { K_OTHER, K_NONE, K_BOOL, K_INT, K_FLOAT, K_STR, K_BYTES, K_BYTEARRAY,
            K_DICT, K_LIST, K_TUPLE };

static inline enum kind
kind_of(PyObject *obj)
{
    PyTypeObject *t = Py_TYPE(obj);
    if (t == &PyUnicode_Type) return K_STR;
    if (t == &PyLong_Type) return K_INT;
    if (t == &PyDict_Type) return K_DICT;
    if (t == &PyList_Type) return K_LIST;
    if (t == &PyTuple_Type) return K_TUPLE;
    if (t == &PyFloat_Type) return K_FLOAT;
    if (obj == Py_None) return K_NONE;
    if (t == &PyBool_Type) return K_BOOL;
    if (t == &PyBytes_Type) return K_BYTES;
    if (t == &PyByteArray_Type) return K_BYTEARRAY;
    return K_OTHER;
}

static int save(Saver *s, PyObject *obj, int pid_allowed);

static int
save_int(Saver *s, PyObject *obj)
{
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (value == -1 && PyErr_Occurred())
        return -1;
    char out[10];
    if (!overflow) {
        if (value >= 0 && value < 0x100) {
            out[0] = ops[OP_BININT1];
            out[1] = (char)value;
            return put(s, out, 2);
        }
        if (value >= 0 && value < 0x10000) {
            out[0] = ops[OP_BININT2];
            out[1] = (char)(value & 0xFF);
            out[2] = (char)(value >> 8);
            return put(s, out, 3);
        }
        if (value >= -0x80000000LL && value < 0x80000000LL) {
            out[0] = ops[OP_BININT];
            le32(out + 1, (uint32_t)(int32_t)value);
            return put(s, out, 5);
        }
        if (s->proto >= 2) {
            /* LONG1: the shortest two's complement little-endian bytes, as
             * pickler._int_to_long_bytes makes them. */
            uint64_t magnitude = value < 0 ? (uint64_t)0 - (uint64_t)value : (uint64_t)value;
            int bits = 0;
            while (magnitude) {
                bits++;
                magnitude >>= 1;
            }
            int size = (bits >> 3) + 1;
            unsigned char data[9];
            for (int i = 0; i < 8; i++)
                data[i] = (unsigned char)((uint64_t)value >> (8 * i) & 0xFF);
            data[8] = value < 0 ? 0xFF : 0x00;
            if (value < 0 && size > 1 && data[size - 1] == 0xFF && (data[size - 2] & 0x80))
                size--;
            out[0] = ops[OP_LONG1];
            out[1] = (char)size;
            memcpy(out + 2, data, (size_t)size);
            return put(s, out, 2 + size);
        }
    }
    return call1(s->save_int, obj);     /* LONG1/LONG4 of a larger int, or protocol 1's text */
}

static int
save_float(Saver *s, PyObject *obj)
{
    char out[9];
    out[0] = ops[OP_BINFLOAT];
    if (PyFloat_Pack8(PyFloat_AS_DOUBLE(obj), out + 1, 0) < 0)
        return -1;
    return put(s, out, 9);
}

/* The opcode and length of a str or bytes argument below the frame size:
 * the 1-byte-length form under 256 bytes where there is one, else 4 bytes. */
static int
put_sized(Saver *s, enum op short_op, int has_short, enum op op4, const char *data,
          Py_ssize_t size)
{
    char out[5];
    if (has_short && size < 256) {
        out[0] = ops[short_op];
        out[1] = (char)size;
        if (put(s, out, 2) < 0)
            return -1;
    }
    else {
        out[0] = ops[op4];
        le32(out + 1, (uint32_t)size);
        if (put(s, out, 5) < 0)
            return -1;
    }
    return put(s, data, size);
}

static int
save_str(Saver *s, PyObject *obj)
{
    PyObject *encoded = NULL;
    const char *data;
    Py_ssize_t size;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(obj) < 0)     /* a str made by the legacy Py_UNICODE API */
        return -1;
#endif
    if (PyUnicode_IS_ASCII(obj)) {
        data = (const char *)PyUnicode_DATA(obj);
        size = PyUnicode_GET_LENGTH(obj);
    }
    else {
        /* Lone surrogates are written as they are, as Python's encode("utf-8",
         * "surrogatepass") does. A temporary, so that the str caches no UTF-8 copy. */
        encoded = PyUnicode_AsEncodedString(obj, "utf-8", "surrogatepass");
        if (encoded == NULL)
            return -1;
        data = PyBytes_AS_STRING(encoded);
        size = PyBytes_GET_SIZE(encoded);
    }
    int status;
    if (size >= frame_size_target)
        status = call1(s->save_str, obj);   /* goes outside the frame: Python's write_payload */
    else if (put_sized(s, OP_SHORT_BINUNICODE, s->proto >= 4, OP_BINUNICODE, data, size) < 0)
        status = -1;
    else
        status = memo_put(s, obj);
    Py_XDECREF(encoded);
    return status;
}

static int
save_bytes(Saver *s, PyObject *obj)
{
    Py_ssize_t size = PyBytes_GET_SIZE(obj);
    if (s->proto < 3 || size >= frame_size_target)
        return call1(s->save_bytes, obj);
    if (put_sized(s, OP_SHORT_BINBYTES, 1, OP_BINBYTES, PyBytes_AS_STRING(obj), size) < 0)
        return -1;
    return memo_put(s, obj);
}

static int
save_bytearray(Saver *s, PyObject *obj)
{
    Py_ssize_t size = PyByteArray_GET_SIZE(obj);
    if (s->proto < 5 || size >= frame_size_target)
        return call1(s->save_bytearray, obj);
    char out[9];
    out[0] = ops[OP_BYTEARRAY8];
    le64(out + 1, (uint64_t)size);
    if (put(s, out, 9) < 0 || put(s, PyByteArray_AS_STRING(obj), size) < 0)
        return -1;
    return memo_put(s, obj);
}

/* Save an item borrowed from a container, holding it across the call. */
static inline int
save_held(Saver *s, PyObject *item)
{
    Py_INCREF(item);
    int status = save(s, item, 1);
    Py_DECREF(item);
    return status;
}

static int
save_tuple(Saver *s, PyObject *obj)
{
    Py_ssize_t size = PyTuple_GET_SIZE(obj);
    if (size == 0)
        return put_op(s, OP_EMPTY_TUPLE);
    int small = size <= 3 && s->proto >= 2;
    if (!small && put_op(s, OP_MARK) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < size; i++) {
        if (save_held(s, PyTuple_GET_ITEM(obj, i)) < 0)
            return -1;
    }
    Py_ssize_t index = memo_index(s, obj);
    if (index >= 0) {
        /* Recursive: saving an item saved the tuple itself. Drop the items just
         * written and use the memoized tuple. */
        if (small) {
            for (Py_ssize_t i = 0; i < size; i++) {
                if (put_op(s, OP_POP) < 0)
                    return -1;
            }
        }
        else if (put_op(s, OP_POP_MARK) < 0)
            return -1;
        return put_memo_get(s, index);
    }
    static const enum op by_size[] = {OP_TUPLE, OP_TUPLE1, OP_TUPLE2, OP_TUPLE3};
    if (put_op(s, small ? by_size[size] : OP_TUPLE) < 0)
        return -1;
    return memo_put(s, obj);
}

/* The items of a list in batches (MARK ... APPENDS), reading its size again after every
 * item, so that a list changed by code run while saving an item is read safely. */
static int
save_list(Saver *s, PyObject *obj)
{
    if (put_op(s, OP_EMPTY_LIST) < 0 || memo_put(s, obj) < 0)
        return -1;
    if (PyList_GET_SIZE(obj) == 0)
        return 0;
    if (PyList_GET_SIZE(obj) == 1) {
        if (save_held(s, PyList_GET_ITEM(obj, 0)) < 0)
            return -1;
        return put_op(s, OP_APPEND);
    }
    Py_ssize_t done = 0;
    do {
        if (put_op(s, OP_MARK) < 0)
            return -1;
        for (Py_ssize_t in_batch = 0; in_batch < batch_size && done < PyList_GET_SIZE(obj);
             in_batch++, done++) {
            if (save_held(s, PyList_GET_ITEM(obj, done)) < 0)
                return -1;
        }
        if (put_op(s, OP_APPENDS) < 0)
            return -1;
    } while (done < PyList_GET_SIZE(obj));
    return 0;
}

static int
dict_changed(void)
{
    PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during iteration");
    return -1;
}

/* Save one (key, value) pair borrowed from a dict, holding both across the calls. */
static int
save_pair(Saver *s, PyObject *key, PyObject *value)
{
    Py_INCREF(key);
    Py_INCREF(value);
    int status = save(s, key, 1);
    if (status == 0)
        status = save(s, value, 1);
    Py_DECREF(key);
    Py_DECREF(value);
    return status;
}

/* SETITEM for one pair; else batches of MARK ... SETITEMS, again while a batch was full
 * (so a size that is a multiple of the batch size ends with an empty batch), with the
 * size checked after each batch. */
static int
save_dict(Saver *s, PyObject *obj)
{
    if (put_op(s, OP_EMPTY_DICT) < 0 || memo_put(s, obj) < 0)
        return -1;
    Py_ssize_t size = PyDict_GET_SIZE(obj);
    if (size == 0)
        return 0;
    Py_ssize_t pos = 0;
    PyObject *item_key, *item_value;
    if (size == 1) {
        if (!PyDict_Next(obj, &pos, &item_key, &item_value))
            return dict_changed();
        if (save_pair(s, item_key, item_value) < 0 || put_op(s, OP_SETITEM) < 0)
            return -1;
        return PyDict_GET_SIZE(obj) != size ? dict_changed() : 0;
    }
    Py_ssize_t in_batch;
    do {
        if (put_op(s, OP_MARK) < 0)
            return -1;
        for (in_batch = 0; in_batch < batch_size; in_batch++) {
            if (!PyDict_Next(obj, &pos, &item_key, &item_value))
                break;
            if (save_pair(s, item_key, item_value) < 0)
                return -1;
            if (PyDict_GET_SIZE(obj) != size)
                return dict_changed();
        }
        if (put_op(s, OP_SETITEMS) < 0)
            return -1;
    } while (in_batch == batch_size);
    return 0;
}

/* Whether persistent_id must be asked about obj (of C's kind `kind`), and not known to
 * answer None: not for atoms when pid_for_atoms is off, and not for a container whose id
 * is not a key of pid_for_ids when that is set. 1: ask; 0: don't; -1: error. */
static int
must_ask(Saver *s, PyObject *obj, enum kind kind)
{
    if (kind <= K_STR)
        return s->pid_for_atoms;
    if (s->pid_for_ids == NULL)
        return 1;
    PyObject *key = PyLong_FromVoidPtr(obj);
    if (key == NULL)
        return -1;
    int found = PyDict_Contains(s->pid_for_ids, key);
    Py_DECREF(key);
    return found;
}

static int
save_owned(Saver *s, PyObject *obj, enum kind kind, int pid_allowed)
{
    if (pid_allowed && s->persistent_id != NULL) {
        int ask = must_ask(s, obj, kind);
        if (ask < 0)
            return -1;
        if (ask) {
            PyObject *pid = PyObject_CallOneArg(s->persistent_id, obj);
            if (pid == NULL)
                return -1;
            if (pid != Py_None) {
                int status = call1(s->save_persistent_id, pid);
                Py_DECREF(pid);
                return status;
            }
            Py_DECREF(pid);
        }
    }
    if (kind >= K_STR) {
        Py_ssize_t index = memo_index(s, obj);
        if (index >= 0)
            return put_memo_get(s, index);
    }
    int status = -1;
    switch (kind) {
    case K_NONE:
        status = put_op(s, OP_NONE);
        break;
    case K_BOOL:
        if (s->proto >= 2)
            status = put_op(s, obj == Py_True ? OP_NEWTRUE : OP_NEWFALSE);
        else
            status = put(s, obj == Py_True ? "I01\n" : "I00\n", 4);
        break;
    case K_INT:
        status = save_int(s, obj);
        break;
    case K_FLOAT:
        status = save_float(s, obj);
        break;
    case K_STR:
        status = save_str(s, obj);
        break;
    case K_BYTES:
        status = save_bytes(s, obj);
        break;
    case K_BYTEARRAY:
        status = save_bytearray(s, obj);
        break;
    default:    /* the containers: they may nest deeply, and C recursion must stop */
        if (Py_EnterRecursiveCall(" while pickling an object"))
            break;
        Py_INCREF(obj);
        status = kind == K_DICT ? save_dict(s, obj)
               : kind == K_LIST ? save_list(s, obj)
               : save_tuple(s, obj);
        Py_DECREF(obj);
        Py_LeaveRecursiveCall();
    }
    return status;
}

static int
save(Saver *s, PyObject *obj, int pid_allowed)
{
    if (Py_SIZE(s->buf) >= frame_size_target) {
        PyObject *result = PyObject_CallNoArgs(s->end_frame);
        if (result == NULL)
            return -1;
        Py_DECREF(result);
    }
    enum kind kind = kind_of(obj);
    if (kind == K_OTHER)
        return call1(s->save_other, obj);
    return save_owned(s, obj, kind, pid_allowed);
}

/* -- the Python interface -------------------------------------------------------------- */

PyDoc_STRVAR(saver_save_doc,
"save(obj)\n\nWrite obj, as the Python pickler's save(obj) would.");

static PyObject *
saver_save(Saver *s, PyObject *obj)
{
    if (save(s, obj, 1) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(saver_save_each_doc,
"save_each(objects, pid_allowed=True)\n\n"
"Write each object of the iterable in turn; with pid_allowed false, without asking\n"
"persistent_id about the objects themselves (a persistent id's own value).");

static PyObject *
saver_save_each(Saver *s, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "save_each(objects, pid_allowed=True)");
        return NULL;
    }
    int pid_allowed = 1;
    if (nargs == 2 && (pid_allowed = PyObject_IsTrue(args[1])) < 0)
        return NULL;
    PyObject *objects = args[0];
    if (PyTuple_CheckExact(objects)) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(objects); i++) {
            if (save(s, PyTuple_GET_ITEM(objects, i), pid_allowed) < 0)
                return NULL;
        }
        Py_RETURN_NONE;
    }
    if (PyList_CheckExact(objects)) {
        Py_INCREF(objects);
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(objects); i++) {
            PyObject *item = PyList_GET_ITEM(objects, i);
            Py_INCREF(item);
            int status = save(s, item, pid_allowed);
            Py_DECREF(item);
            if (status < 0) {
                Py_DECREF(objects);
                return NULL;
            }
        }
        Py_DECREF(objects);
        Py_RETURN_NONE;
    }
    PyObject *iterator = PyObject_GetIter(objects);
    if (iterator == NULL)
        return NULL;
    PyObject *item;
    while ((item = PyIter_Next(iterator)) != NULL) {
        int status = save(s, item, pid_allowed);
        Py_DECREF(item);
        if (status < 0) {
            Py_DECREF(iterator);
            return NULL;
        }
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static int
saver_traverse(Saver *s, visitproc visit, void *arg)
{
    Py_VISIT(s->buf);
    Py_VISIT(s->memo);
    Py_VISIT(s->persistent_id);
    Py_VISIT(s->pid_for_ids);
    Py_VISIT(s->end_frame);
    Py_VISIT(s->save_other);
    Py_VISIT(s->save_persistent_id);
    Py_VISIT(s->save_str);
    Py_VISIT(s->save_int);
    Py_VISIT(s->save_bytes);
    Py_VISIT(s->save_bytearray);
    return 0;
}

static int
saver_clear(Saver *s)
{
    Py_CLEAR(s->buf);
    Py_CLEAR(s->memo);
    Py_CLEAR(s->persistent_id);
    Py_CLEAR(s->pid_for_ids);
    Py_CLEAR(s->end_frame);
    Py_CLEAR(s->save_other);
    Py_CLEAR(s->save_persistent_id);
    Py_CLEAR(s->save_str);
    Py_CLEAR(s->save_int);
    Py_CLEAR(s->save_bytes);
    Py_CLEAR(s->save_bytearray);
    return 0;
}

static void
saver_dealloc(Saver *s)
{
    PyObject_GC_UnTrack(s);
    saver_clear(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *
saver_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *buf, *memo, *persistent_id, *pid_for_ids;
    PyObject *end_frame, *save_other, *save_persistent_id;
    PyObject *str_saver, *int_saver, *bytes_saver, *bytearray_saver;
    int proto, pid_for_atoms;
    static char *keywords[] = {"buf", "memo", "proto", "persistent_id",
                               "persistent_id_for_atoms", "persistent_id_for_ids",
                               "callbacks", NULL};
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "configure() has not been called");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!iOpO(OOOOOOO):Saver", keywords,
                                     &PyByteArray_Type, &buf, &MemoType, &memo, &proto,
                                     &persistent_id, &pid_for_atoms, &pid_for_ids,
                                     &end_frame, &save_other, &save_persistent_id,
                                     &str_saver, &int_saver, &bytes_saver, &bytearray_saver))
        return NULL;
    if (proto < 1 || proto > 5) {
        PyErr_Format(PyExc_ValueError, "Saver writes protocols 1 to 5, not %d", proto);
        return NULL;
    }
    if (pid_for_ids != Py_None && !PyDict_Check(pid_for_ids)) {
        PyErr_Format(PyExc_TypeError, "persistent_id_for_ids must be a dict or None, not %.200s",
                     Py_TYPE(pid_for_ids)->tp_name);
        return NULL;
    }
    Saver *s = (Saver *)type->tp_alloc(type, 0);
    if (s == NULL)
        return NULL;
    s->proto = proto;
    s->pid_for_atoms = pid_for_atoms;
    s->buf = Py_NewRef(buf);
    s->memo = (Memo *)Py_NewRef(memo);
    s->persistent_id = persistent_id == Py_None ? NULL : Py_NewRef(persistent_id);
    s->pid_for_ids = pid_for_ids == Py_None ? NULL : Py_NewRef(pid_for_ids);
    s->end_frame = Py_NewRef(end_frame);
    s->save_other = Py_NewRef(save_other);
    s->save_persistent_id = Py_NewRef(save_persistent_id);
    s->save_str = Py_NewRef(str_saver);
    s->save_int = Py_NewRef(int_saver);
    s->save_bytes = Py_NewRef(bytes_saver);
    s->save_bytearray = Py_NewRef(bytearray_saver);
    return (PyObject *)s;
}

static PyMethodDef saver_methods[] = {
    {"save", (PyCFunction)saver_save, METH_O, saver_save_doc},
    {"save_each", (PyCFunction)(void (*)(void))saver_save_each, METH_FASTCALL,
     saver_save_each_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(saver_doc,
"Saver(buf, memo, proto, persistent_id, persistent_id_for_atoms, persistent_id_for_ids,\n"
"      callbacks)\n\n"
"The C half of one pickler's dump: writes plain data into `buf` with `memo`, and hands\n"
"everything else to the Python callbacks (end_frame, save_other, save_persistent_id,\n"
"save_str, save_int, save_bytes, save_bytearray). `persistent_id` is None when its\n"
"answer is always None.");

static PyTypeObject SaverType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pstore.engine._pickler_speedups.Saver",
    .tp_basicsize = sizeof(Saver),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = saver_doc,
    .tp_new = saver_new,
    .tp_dealloc = (destructor)saver_dealloc,
    .tp_traverse = (traverseproc)saver_traverse,
    .tp_clear = (inquiry)saver_clear,
    .tp_methods = saver_methods,
};

PyDoc_STRVAR(configure_doc,
"configure(codes, batch_size, frame_size_target)\n\n"
"Tell Saver the byte of each opcode it writes (`codes` maps opcode names to bytes),\n"
"the number of items per APPENDS/SETITEMS and the size at which a frame ends.");

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *codes;
    Py_ssize_t batch, frame;
    if (!PyArg_ParseTuple(args, "Onn:configure", &codes, &batch, &frame))
        return NULL;
    if (batch < 1 || frame < 1) {
        PyErr_SetString(PyExc_ValueError, "batch and frame sizes must be positive");
        return NULL;
    }
    char table[OP_COUNT];
    for (int i = 0; i < OP_COUNT; i++) {
        PyObject *code = PyMapping_GetItemString(codes, op_names[i]);
        if (code == NULL)
            return NULL;
        long byte = PyLong_AsLong(code);
        Py_DECREF(code);
        if (byte == -1 && PyErr_Occurred())
            return NULL;
        if (byte < 0 || byte > 255) {
            PyErr_Format(PyExc_ValueError, "opcode %s has byte %ld", op_names[i], byte);
            return NULL;
        }
        table[i] = (char)byte;
    }
    memcpy(ops, table, sizeof ops);
    batch_size = batch;
    frame_size_target = frame;
    configured = 1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, configure_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pstore.engine._pickler_speedups",
    .m_doc = "The pickler's fast path for plain data (see pickler._make_dump).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__pickler_speedups(void)
{
    if (PyType_Ready(&SaverType) < 0 || PyType_Ready(&MemoType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    Py_INCREF(&SaverType);
    if (PyModule_AddObject(module, "Saver", (PyObject *)&SaverType) < 0) {
        Py_DECREF(&SaverType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&MemoType);
    if (PyModule_AddObject(module, "Memo", (PyObject *)&MemoType) < 0) {
        Py_DECREF(&MemoType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
