/* pstore.engine._speedups: the unpickler's fast path for data opcodes, in C.
 *
 * Its first function, run(data, pos, stack, metastack, memo[, mark_limit]) -> (pos, stack), runs the
 * opcodes of `data` from `pos` with the same state the pure-Python loop of
 * Unpickler._run keeps (the current stack level, the levels below the marks, the
 * memo), and returns where it stopped and the current level. It stops *before* the
 * first opcode it does not take, leaving that opcode untouched for the Python loop,
 * which then calls run() again after its next handler. A second, load_pickle(), reads
 * a pickle from its start with a state of its own (the same loop, plus the PROTO that
 * opens the pickle and the STOP that ends it): a pickle of plain data costs one call
 * from Python, and any other goes on in the Python loop from where it stopped. It takes only opcodes that
 * build plain data (containers, numbers, strings, bytes, the memo, marks), and it
 * stops instead of raising: on an opcode it does not know, a truncated argument, a
 * stack underflow, a missing memo entry, undecodable text, a dict key or set item
 * that is not a plain atom (or a short tuple of them), or a container that is not
 * exactly a list, dict or set.
 * The Python loop then runs that opcode, and raises the error it names with its
 * opcode and offset. So:
 *
 *   - results and errors are those of the pure-Python unpickler (the tests run both);
 *   - no globals are resolved and no persistent ids: whatever a pickle may import or
 *     call is decided in Python, by find_class;
 *   - it calls no user code on purpose (only exact str/int/float/bytes/None/bool are
 *     hashed as keys, only exact lists, dicts and sets are filled), but user code can
 *     still run under it: an __eq__ of a user object already in a dict or set that a
 *     new key collides with, a __del__ of a value it replaces, a finalizer run by the
 *     garbage collector at any allocation. So every object used across such a call is
 *     held by a reference of its own, and list sizes are read again after it;
 *   - an Exception raised by such code (or a BytesWarning under -bb) is cleared and
 *     run() stops before the opcode: the Python loop runs it again and raises the
 *     error with its location. Running it again gives the same state, since
 *     re-inserting the same keys into a dict or set changes nothing. MemoryError and
 *     non-Exceptions (KeyboardInterrupt, SystemExit) propagate at once.
 *
 * Opcode bytes are not written here: set_opcodes() receives them by name from the
 * table in opcodes.py, the one table of the engine.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum kind {
    K_OTHER = 0,    /* left to Python (every byte set_opcodes does not name) */
    K_MARK, K_FRAME, K_POP, K_DUP,
    K_NONE, K_NEWTRUE, K_NEWFALSE,
    K_BININT, K_BININT1, K_BININT2, K_LONG1, K_BINFLOAT,
    K_SHORT_BINUNICODE, K_BINUNICODE, K_SHORT_BINBYTES, K_BINBYTES,
    K_EMPTY_LIST, K_EMPTY_DICT, K_EMPTY_TUPLE, K_EMPTY_SET,
    K_TUPLE1, K_TUPLE2, K_TUPLE3,
    K_APPEND, K_SETITEM,
    K_MEMOIZE, K_BINPUT, K_LONG_BINPUT, K_BINGET, K_LONG_BINGET,
    /* the mark consumers: they take the items above the top mark */
    K_TUPLE, K_LIST, K_DICT, K_FROZENSET, K_APPENDS, K_SETITEMS, K_ADDITEMS,
    /* taken only by load_pickle(), at a pickle's start and end; run() stops before them */
    K_PROTO, K_STOP,
};

static const struct { const char *name; unsigned char kind; } kind_names[] = {
    {"MARK", K_MARK}, {"FRAME", K_FRAME}, {"POP", K_POP}, {"DUP", K_DUP},
    {"NONE", K_NONE}, {"NEWTRUE", K_NEWTRUE}, {"NEWFALSE", K_NEWFALSE},
    {"BININT", K_BININT}, {"BININT1", K_BININT1}, {"BININT2", K_BININT2},
    {"LONG1", K_LONG1}, {"BINFLOAT", K_BINFLOAT},
    {"SHORT_BINUNICODE", K_SHORT_BINUNICODE}, {"BINUNICODE", K_BINUNICODE},
    {"SHORT_BINBYTES", K_SHORT_BINBYTES}, {"BINBYTES", K_BINBYTES},
    {"EMPTY_LIST", K_EMPTY_LIST}, {"EMPTY_DICT", K_EMPTY_DICT},
    {"EMPTY_TUPLE", K_EMPTY_TUPLE}, {"EMPTY_SET", K_EMPTY_SET},
    {"TUPLE1", K_TUPLE1}, {"TUPLE2", K_TUPLE2}, {"TUPLE3", K_TUPLE3},
    {"APPEND", K_APPEND}, {"SETITEM", K_SETITEM},
    {"MEMOIZE", K_MEMOIZE}, {"BINPUT", K_BINPUT}, {"LONG_BINPUT", K_LONG_BINPUT},
    {"BINGET", K_BINGET}, {"LONG_BINGET", K_LONG_BINGET},
    {"TUPLE", K_TUPLE}, {"LIST", K_LIST}, {"DICT", K_DICT}, {"FROZENSET", K_FROZENSET},
    {"APPENDS", K_APPENDS}, {"SETITEMS", K_SETITEMS}, {"ADDITEMS", K_ADDITEMS},
    {"PROTO", K_PROTO}, {"STOP", K_STOP},
};

#define KIND_COUNT (sizeof(kind_names) / sizeof(kind_names[0]))

/* The kind of each opcode byte; all K_OTHER (so run() takes nothing) until set_opcodes(). */
static unsigned char kinds[256];

/* The highest protocol a PROTO opcode may declare (set_opcodes()); load_pickle() leaves a
 * higher one, or any until set, to Python, which refuses it. */
static int highest_protocol = -1;

static uint32_t
read_uint4(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t
read_uint8(const unsigned char *p)
{
    return (uint64_t)read_uint4(p) | (uint64_t)read_uint4(p + 4) << 32;
}

/* A dict key or set item whose hash and equality run no Python code: an exact str,
 * int, float or bytes, None, True or False. Anything else is left to Python. */
static int
is_plain_atom(PyObject *obj)
{
    return PyUnicode_CheckExact(obj) || PyLong_CheckExact(obj) || PyFloat_CheckExact(obj)
        || PyBytes_CheckExact(obj) || obj == Py_None || obj == Py_True || obj == Py_False;
}

/* Tuples of at most this many plain atoms are plain keys too: hashing one runs no Python
 * code and visits a bounded number of objects, so even a key inserted again and again
 * through the memo costs work proportional to the pickle (the restricted unpickler's
 * budget counts on that). */
#define PLAIN_TUPLE_MAX 8

static int
is_plain_key(PyObject *obj)
{
    if (is_plain_atom(obj))
        return 1;
    if (!PyTuple_CheckExact(obj) || PyTuple_GET_SIZE(obj) > PLAIN_TUPLE_MAX)
        return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(obj); i++) {
        if (!is_plain_atom(PyTuple_GET_ITEM(obj, i)))
            return 0;
    }
    return 1;
}

static int
all_plain(PyObject *items, Py_ssize_t from, Py_ssize_t step)
{
    Py_ssize_t n = PyList_GET_SIZE(items);
    for (Py_ssize_t i = from; i < n; i += step) {
        if (!is_plain_key(PyList_GET_ITEM(items, i)))
            return 0;
    }
    return 1;
}

/* Text of BINUNICODE*: UTF-8 that may hold lone surrogates. NULL without an error set
 * means "not decodable": the Python loop raises the UnicodeDecodeError itself. */
static PyObject *
decode_text(const unsigned char *p, Py_ssize_t n)
{
    PyObject *text = PyUnicode_DecodeUTF8((const char *)p, n, "surrogatepass");
    if (text == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
        PyErr_Clear();
    return text;
}

/* The memo: run()'s is the unpickler's dict (the Python loop shares it); load_pickle()'s
 * is an array of its own while C runs, made a dict only if the Python loop goes on. */
typedef struct {
    PyObject *dict;         /* the memo as a dict, or NULL: then `items` is it */
    PyObject **items;       /* items[i]: memo entry i, or NULL where there is none */
    Py_ssize_t size;        /* slots in `items` */
    Py_ssize_t count;       /* entries in `items` */
} Memo;

/* An index this far beyond the array's entries makes the memo a dict instead: the array
 * stays proportional to what the pickle put in it, whatever indexes it names. */
#define MEMO_ARRAY_SLACK 1024

static Py_ssize_t
memo_len(const Memo *memo)
{
    return memo->dict != NULL ? PyDict_GET_SIZE(memo->dict) : memo->count;
}

/* Entry `index` (borrowed), or NULL: with an exception set on failure, else none. */
static PyObject *
memo_get(const Memo *memo, Py_ssize_t index)
{
    if (memo->dict == NULL)
        return index < memo->size ? memo->items[index] : NULL;
    PyObject *key = PyLong_FromSsize_t(index);
    if (key == NULL)
        return NULL;
    PyObject *value = PyDict_GetItemWithError(memo->dict, key);   /* borrowed */
    Py_DECREF(key);
    return value;
}

static int
dict_set_index(PyObject *dict, Py_ssize_t index, PyObject *value)
{
    PyObject *key = PyLong_FromSsize_t(index);
    if (key == NULL)
        return -1;
    int status = PyDict_SetItem(dict, key, value);
    Py_DECREF(key);
    return status;
}

/* Release the array of `memo` (its entries and its slots). */
static void
memo_free_items(Memo *memo)
{
    for (Py_ssize_t i = 0; i < memo->size; i++)
        Py_XDECREF(memo->items[i]);
    PyMem_Free(memo->items);
    memo->items = NULL;
    memo->size = memo->count = 0;
}

/* Make an array memo a dict of the same entries. */
static int
memo_make_dict(Memo *memo)
{
    PyObject *dict = PyDict_New();
    if (dict == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < memo->size; i++) {
        if (memo->items[i] != NULL && dict_set_index(dict, i, memo->items[i]) < 0) {
            Py_DECREF(dict);
            return -1;
        }
    }
    memo_free_items(memo);
    memo->dict = dict;
    return 0;
}

/* memo[index] = value (a new reference of the memo's own is taken). */
static int
memo_set(Memo *memo, Py_ssize_t index, PyObject *value)
{
    if (memo->dict == NULL && index >= memo->size) {
        if (index > 2 * memo->count + MEMO_ARRAY_SLACK) {
            if (memo_make_dict(memo) < 0)
                return -1;
        } else {
            Py_ssize_t size = memo->size ? 2 * memo->size : 64;
            if (size <= index)
                size = index + 1;
            PyObject **items = PyMem_Realloc(memo->items, (size_t)size * sizeof *items);
            if (items == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            memset(items + memo->size, 0, (size_t)(size - memo->size) * sizeof *items);
            memo->items = items;
            memo->size = size;
        }
    }
    if (memo->dict != NULL)
        return dict_set_index(memo->dict, index, value);
    PyObject *old = memo->items[index];
    memo->items[index] = Py_NewRef(value);
    if (old == NULL)
        memo->count++;
    Py_XDECREF(old);
    return 0;
}

/* memo[index] = the top of `stack` (depth items). */
static int
memo_put(Memo *memo, Py_ssize_t index, PyObject *stack, Py_ssize_t depth)
{
    PyObject *top = Py_NewRef(PyList_GET_ITEM(stack, depth - 1));
    int status = memo_set(memo, index, top);
    Py_DECREF(top);
    return status;
}

/* dict[key] = value, all three held meanwhile: an __eq__ that the insertion reaches (a
 * key already in `dict` that `key` collides with) may drop every other reference. */
static int
set_item(PyObject *dict, PyObject *key, PyObject *value)
{
    Py_INCREF(dict);
    Py_INCREF(key);
    Py_INCREF(value);
    int status = PyDict_SetItem(dict, key, value);
    Py_DECREF(dict);
    Py_DECREF(key);
    Py_DECREF(value);
    return status;
}

/* dict[items[0]] = items[1], dict[items[2]] = items[3], ... (`dict` held throughout;
 * the size of `items` read again after each insertion, which may have run user code). */
static int
insert_pairs(PyObject *dict, PyObject *items)
{
    int status = 0;
    Py_INCREF(dict);
    for (Py_ssize_t i = 0; status == 0 && i + 1 < PyList_GET_SIZE(items); i += 2)
        status = set_item(dict, PyList_GET_ITEM(items, i), PyList_GET_ITEM(items, i + 1));
    Py_DECREF(dict);
    return status;
}

/* set.add(item) for each of `items`, holding `set` and each item meanwhile. */
static int
add_all(PyObject *set, PyObject *items)
{
    int status = 0;
    Py_INCREF(set);
    for (Py_ssize_t i = 0; status == 0 && i < PyList_GET_SIZE(items); i++) {
        PyObject *item = Py_NewRef(PyList_GET_ITEM(items, i));
        status = PySet_Add(set, item);
        Py_DECREF(item);
    }
    Py_DECREF(set);
    return status;
}

/* Remove the top `n` (at most 3) items of list `stack`, or all of them if it holds fewer
 * (user code may have emptied it meanwhile). The size is cut first and the items are
 * released after, so code a release runs (a __del__) sees the list without them. Cheaper
 * than PyList_SetSlice, which the stack's every pop would otherwise cost. */
static void
drop_top(PyObject *stack, Py_ssize_t n)
{
    PyObject *dropped[3];
    Py_ssize_t size = PyList_GET_SIZE(stack);
    if (n > size)
        n = size;
    for (Py_ssize_t i = 0; i < n; i++)
        dropped[i] = PyList_GET_ITEM(stack, size - n + i);
    Py_SET_SIZE(stack, size - n);
    for (Py_ssize_t i = 0; i < n; i++)
        Py_DECREF(dropped[i]);
}

/* After a failure with an exception set: 1 (exception cleared) if the opcode is to be
 * left to Python, which raises it again with its location; 0 if it must propagate. */
static int
leave_error_to_python(void)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception) || PyErr_ExceptionMatches(PyExc_MemoryError))
        return 0;
    PyErr_Clear();
    return 1;
}

/* Run the mark consumer `kind` on `items`, the level above the top mark, and `outer`,
 * the level below it (both held by the caller). Returns 1 when done, 0 to leave the
 * opcode to Python (nothing was changed), -1 on failure (an exception is set). */
static int
consume_mark(int kind, PyObject *items, PyObject *outer)
{
    Py_ssize_t n = PyList_GET_SIZE(items);
    Py_ssize_t outer_depth = PyList_GET_SIZE(outer);
    PyObject *target = outer_depth ? PyList_GET_ITEM(outer, outer_depth - 1) : NULL;
    PyObject *made;         /* the new object, for the consumers that make one */
    int status;
    switch (kind) {
    case K_TUPLE:
        made = PyList_AsTuple(items);
        break;
    case K_LIST:
        made = Py_NewRef(items);
        break;
    case K_DICT:
        if ((n & 1) || !all_plain(items, 0, 2))
            return 0;
        made = PyDict_New();
        if (made != NULL && insert_pairs(made, items) < 0)
            Py_CLEAR(made);
        break;
    case K_FROZENSET:
        if (!all_plain(items, 0, 1))
            return 0;
        made = PyFrozenSet_New(items);
        break;
    case K_APPENDS:
        if (target == NULL || !PyList_CheckExact(target))
            return 0;
        /* Appending runs no Python code: `target` stays valid throughout. */
        return PyList_SetSlice(target, PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, items) < 0 ? -1 : 1;
    case K_SETITEMS:
        if (target == NULL || !PyDict_CheckExact(target) || (n & 1) || !all_plain(items, 0, 2))
            return 0;
        return insert_pairs(target, items) < 0 ? -1 : 1;
    case K_ADDITEMS:
        if (target == NULL || !PySet_CheckExact(target) || !all_plain(items, 0, 1))
            return 0;
        return add_all(target, items) < 0 ? -1 : 1;
    default:
        return 0;
    }
    if (made == NULL)
        return -1;
    status = PyList_Append(outer, made);
    Py_DECREF(made);
    return status < 0 ? -1 : 1;
}

/* How many emptied level lists run_opcodes keeps for reuse. */
#define SPARE_LEVELS 8

/* Run the data opcodes of s[0:end] from *pos_inout on the unpickler state: *stack_inout
 * (the current level, a reference of the caller's, replaced as marks open and close),
 * `metastack` and `memo`. Returns 0 with *pos_inout at the first opcode not run, or -1
 * with an exception set; either way *stack_inout is the current level, still the
 * caller's to release. */
static int
run_opcodes(const unsigned char *s, Py_ssize_t end, Py_ssize_t *pos_inout,
            PyObject **stack_inout, PyObject *metastack, Memo *memo, Py_ssize_t mark_limit)
{
    Py_ssize_t pos = *pos_inout;
    PyObject *stack = *stack_inout;
    /* Emptied level lists, for the next MARKs: enough for containers nested this deep. */
    PyObject *spares[SPARE_LEVELS];
    int spare_count = 0;

    /* Each case either runs its opcode whole and moves `pos` past it, or leaves `pos`
     * and everything else as they were and breaks out of the loop ("goto stop"). */
    while (pos >= 0 && pos < end) {
        const unsigned char *arg = s + pos + 1;
        Py_ssize_t avail = end - pos - 1;    /* bytes after the opcode */
        Py_ssize_t depth = PyList_GET_SIZE(stack);
        PyObject *value;                     /* a new reference, pushed at "push" */
        Py_ssize_t next = pos + 1;           /* where the opcode ends (if it has no argument) */

        switch (kinds[s[pos]]) {
        case K_SHORT_BINUNICODE:
            if (avail < 1 || avail < 1 + arg[0])
                goto stop;
            next = pos + 2 + arg[0];
            value = decode_text(arg + 1, arg[0]);
            if (value == NULL)
                goto failed;
            goto push;
        case K_BINUNICODE: {
            if (avail < 4 || (uint64_t)avail - 4 < read_uint4(arg))
                goto stop;
            Py_ssize_t n = (Py_ssize_t)read_uint4(arg);
            next = pos + 5 + n;
            value = decode_text(arg + 4, n);
            if (value == NULL)
                goto failed;
            goto push;
        }
        case K_SHORT_BINBYTES:
            if (avail < 1 || avail < 1 + arg[0])
                goto stop;
            next = pos + 2 + arg[0];
            value = PyBytes_FromStringAndSize((const char *)arg + 1, arg[0]);
            goto push;
        case K_BINBYTES: {
            if (avail < 4 || (uint64_t)avail - 4 < read_uint4(arg))
                goto stop;
            Py_ssize_t n = (Py_ssize_t)read_uint4(arg);
            next = pos + 5 + n;
            value = PyBytes_FromStringAndSize((const char *)arg + 4, n);
            goto push;
        }
        case K_BININT1:
            if (avail < 1)
                goto stop;
            next = pos + 2;
            value = PyLong_FromLong(arg[0]);
            goto push;
        case K_BININT2:
            if (avail < 2)
                goto stop;
            next = pos + 3;
            value = PyLong_FromLong(arg[0] | arg[1] << 8);
            goto push;
        case K_BININT:
            if (avail < 4)
                goto stop;
            next = pos + 5;
            value = PyLong_FromLong((int32_t)read_uint4(arg));
            goto push;
        case K_LONG1: {
            /* Little-endian two's complement; up to 8 bytes here, longer ones in Python. */
            if (avail < 1 || avail < 1 + arg[0] || arg[0] > 8)
                goto stop;
            int n = arg[0];
            uint64_t bits = 0;
            for (int i = 0; i < n; i++)
                bits |= (uint64_t)arg[1 + i] << (8 * i);
            if (n > 0 && n < 8 && (arg[n] & 0x80))
                bits |= ~(uint64_t)0 << (8 * n);        /* sign-extend */
            next = pos + 2 + n;
            value = PyLong_FromLongLong((long long)(int64_t)bits);
            goto push;
        }
        case K_BINFLOAT: {
            /* 8 bytes, big-endian IEEE 754, as every platform CPython runs on has them. */
            if (avail < 8)
                goto stop;
            uint64_t bits = 0;
            for (int i = 0; i < 8; i++)
                bits = bits << 8 | arg[i];
            double number;
            memcpy(&number, &bits, sizeof number);
            next = pos + 9;
            value = PyFloat_FromDouble(number);
            goto push;
        }
        case K_NONE:
            value = Py_NewRef(Py_None);
            goto push;
        case K_NEWTRUE:
            value = Py_NewRef(Py_True);
            goto push;
        case K_NEWFALSE:
            value = Py_NewRef(Py_False);
            goto push;
        case K_EMPTY_LIST:
            value = PyList_New(0);
            goto push;
        case K_EMPTY_DICT:
            value = PyDict_New();
            goto push;
        case K_EMPTY_TUPLE:
            value = PyTuple_New(0);
            goto push;
        case K_EMPTY_SET:
            value = PySet_New(NULL);
            goto push;
        case K_DUP:
            if (depth < 1)
                goto stop;
            value = Py_NewRef(PyList_GET_ITEM(stack, depth - 1));
            goto push;
        case K_BINGET:
        case K_LONG_BINGET: {
            int wide = kinds[s[pos]] == K_LONG_BINGET;
            if (avail < (wide ? 4 : 1))
                goto stop;
            value = memo_get(memo, wide ? (Py_ssize_t)read_uint4(arg) : arg[0]);
            if (value == NULL) {
                if (PyErr_Occurred())
                    goto error;
                goto stop;          /* not in the memo: Python names the index */
            }
            Py_INCREF(value);
            next = pos + (wide ? 5 : 2);
            goto push;
        }
        case K_MEMOIZE:
            if (depth < 1)
                goto stop;
            if (memo_put(memo, memo_len(memo), stack, depth) < 0)
                goto error;
            pos += 1;
            continue;
        case K_BINPUT:
        case K_LONG_BINPUT: {
            int wide = kinds[s[pos]] == K_LONG_BINPUT;
            if (avail < (wide ? 4 : 1) || depth < 1)
                goto stop;
            Py_ssize_t index = wide ? (Py_ssize_t)read_uint4(arg) : arg[0];
            if (memo_put(memo, index, stack, depth) < 0)
                goto error;
            pos += wide ? 5 : 2;
            continue;
        }
        case K_FRAME:
            /* A frame only promises that its bytes are there. */
            if (avail < 8 || (uint64_t)avail - 8 < read_uint8(arg))
                goto stop;
            pos += 9;
            continue;
        case K_POP:
            if (depth < 1)
                goto stop;          /* popping the mark itself: Python's */
            drop_top(stack, 1);
            pos += 1;
            continue;
        case K_TUPLE1:
        case K_TUPLE2:
        case K_TUPLE3: {
            Py_ssize_t n = kinds[s[pos]] - K_TUPLE1 + 1;
            if (depth < n)
                goto stop;
            value = PyTuple_New(n);
            if (value == NULL)
                goto error;
            /* The allocation may have run the collector, and a finalizer may have changed
             * the stack: its size is read again. */
            depth = PyList_GET_SIZE(stack);
            if (depth < n) {
                Py_DECREF(value);
                goto stop;
            }
            for (Py_ssize_t i = 0; i < n; i++)
                PyTuple_SET_ITEM(value, i, Py_NewRef(PyList_GET_ITEM(stack, depth - n + i)));
            drop_top(stack, n);
            goto push;
        }
        case K_APPEND: {
            if (depth < 2 || !PyList_CheckExact(PyList_GET_ITEM(stack, depth - 2)))
                goto stop;
            if (PyList_Append(PyList_GET_ITEM(stack, depth - 2),
                              PyList_GET_ITEM(stack, depth - 1)) < 0)
                goto error;
            drop_top(stack, 1);
            pos += 1;
            continue;
        }
        case K_SETITEM: {
            if (depth < 3 || !PyDict_CheckExact(PyList_GET_ITEM(stack, depth - 3))
                    || !is_plain_key(PyList_GET_ITEM(stack, depth - 2)))
                goto stop;
            if (set_item(PyList_GET_ITEM(stack, depth - 3), PyList_GET_ITEM(stack, depth - 2),
                         PyList_GET_ITEM(stack, depth - 1)) < 0)
                goto failed;
            drop_top(stack, 2);
            pos += 1;
            continue;
        }
        case K_MARK: {
            if (PyList_GET_SIZE(metastack) >= mark_limit)
                goto stop;
            PyObject *level = spare_count ? spares[--spare_count] : PyList_New(0);
            if (level == NULL)
                goto error;
            if (PyList_Append(metastack, stack) < 0) {
                Py_DECREF(level);
                goto error;
            }
            Py_SETREF(stack, level);
            pos += 1;
            continue;
        }
        case K_TUPLE:
        case K_LIST:
        case K_DICT:
        case K_FROZENSET:
        case K_APPENDS:
        case K_SETITEMS:
        case K_ADDITEMS: {
            /* `stack` holds the items above the top mark; `outer` is the level below. */
            Py_ssize_t levels = PyList_GET_SIZE(metastack);
            if (levels < 1)
                goto stop;
            PyObject *outer = Py_NewRef(PyList_GET_ITEM(metastack, levels - 1));
            int done = consume_mark(kinds[s[pos]], stack, outer);
            if (done <= 0) {
                Py_DECREF(outer);
                if (done == 0)
                    goto stop;
                goto failed;
            }
            /* Back to the level below the mark (read again: user code may have run). The
             * level left is kept, emptied, for the next MARK when nothing else holds it
             * (LIST made it the list): no list made and grown again for each container. */
            PyObject *left = stack;
            stack = outer;
            if (spare_count < SPARE_LEVELS && Py_REFCNT(left) == 1) {
                Py_ssize_t n = PyList_GET_SIZE(left);
                PyObject **items = ((PyListObject *)left)->ob_item;
                Py_SET_SIZE(left, 0);
                for (Py_ssize_t i = 0; i < n; i++)
                    Py_DECREF(items[i]);
                if (Py_REFCNT(left) == 1 && PyList_GET_SIZE(left) == 0)
                    spares[spare_count++] = left;
                else
                    Py_DECREF(left);
            } else {
                Py_DECREF(left);
            }
            drop_top(metastack, 1);
            pos += 1;
            continue;
        }
        default:
            goto stop;
        }

    push:
        if (value == NULL)
            goto error;
        if (PyList_Append(stack, value) < 0) {
            Py_DECREF(value);
            goto error;
        }
        Py_DECREF(value);
        pos = next;
        continue;

    failed:
        /* Nothing made, or an insertion failed: with no exception set (undecodable text)
         * or one that user code raised, the opcode is Python's; else the error propagates. */
        if (PyErr_Occurred() && !leave_error_to_python())
            goto error;
        goto stop;
    }
stop:
    while (spare_count)
        Py_DECREF(spares[--spare_count]);
    *pos_inout = pos;
    *stack_inout = stack;
    return 0;
error:
    while (spare_count)
        Py_DECREF(spares[--spare_count]);
    *pos_inout = pos;
    *stack_inout = stack;
    return -1;
}

PyDoc_STRVAR(run_doc,
"run(data, pos, stack, metastack, memo[, mark_limit]) -> (pos, stack)\n\n"
"Run the data opcodes of bytes `data` from `pos`, on the unpickler state `stack` (the\n"
"current level), `metastack` (the levels below the marks) and `memo`. Returns the\n"
"offset of the first opcode not run and the current level. A MARK that would open\n"
"more than `mark_limit` marks is not run.");

static PyObject *
run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 && nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "run() takes 5 or 6 arguments");
        return NULL;
    }
    /* At most this many marks open at once: a MARK beyond it is left to Python, which
     * refuses it (the restricted unpickler's budget). */
    Py_ssize_t mark_limit = PY_SSIZE_T_MAX;
    if (nargs == 6) {
        mark_limit = PyLong_AsSsize_t(args[5]);
        if (mark_limit == -1 && PyErr_Occurred())
            return NULL;
    }
    if (!PyBytes_CheckExact(args[0]) || !PyLong_Check(args[1]) || !PyList_CheckExact(args[2])
            || !PyList_CheckExact(args[3]) || !PyDict_CheckExact(args[4]))
        return PyTuple_Pack(2, args[1], args[2]);   /* e.g. a memo set to a non-dict: all Python's */
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    PyObject *stack = Py_NewRef(args[2]);
    Memo memo = {args[4], NULL, 0, 0};
    if (run_opcodes((const unsigned char *)PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]),
                    &pos, &stack, args[3], &memo, mark_limit) < 0) {
        Py_DECREF(stack);
        return NULL;
    }
    return Py_BuildValue("(nN)", pos, stack);      /* N: the tuple takes our reference */
}

PyDoc_STRVAR(load_pickle_doc,
"load_pickle(data, start, mark_limit) -> (value, end) | (pos, stack, metastack, memo, proto)\n\n"
"Read the pickle at offset `start` of bytes `data` with a memo of its own, as run() reads\n"
"(a PROTO at its start included). When it reaches the pickle's STOP: the object and the\n"
"offset after the STOP. Otherwise the state where it stopped, for the Python loop to go\n"
"on from: the offset of the first opcode not run, the current level, the levels below\n"
"the marks, the memo and the protocol its PROTO declared (0 if none was run).");

/* The common pickle (PROTO, FRAME, plain data, STOP) in one call, with no Python between
 * its opcodes; anything else goes on in Python from where it stopped, so no work is
 * done twice and every error is still raised by the Python loop. */
static PyObject *
load_pickle(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "load_pickle() takes 3 arguments");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t mark_limit = PyLong_AsSsize_t(args[2]);
    if (mark_limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *stack = PyList_New(0), *metastack = PyList_New(0);
    Memo memo = {NULL, NULL, 0, 0};
    if (stack == NULL || metastack == NULL)
        goto error;
    int proto = 0;
    if (PyBytes_CheckExact(args[0])) {
        const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(args[0]);
        Py_ssize_t end = PyBytes_GET_SIZE(args[0]);
        if (pos >= 0 && end - pos >= 2 && kinds[s[pos]] == K_PROTO
                && s[pos + 1] <= highest_protocol) {
            proto = s[pos + 1];
            pos += 2;
        }
        if (run_opcodes(s, end, &pos, &stack, metastack, &memo, mark_limit) < 0)
            goto error;
        Py_ssize_t depth = PyList_GET_SIZE(stack);
        if (pos >= 0 && pos < end && kinds[s[pos]] == K_STOP && depth > 0) {
            PyObject *value = Py_NewRef(PyList_GET_ITEM(stack, depth - 1));
            Py_DECREF(stack);
            Py_DECREF(metastack);
            memo_free_items(&memo);
            Py_XDECREF(memo.dict);
            return Py_BuildValue("(Nn)", value, pos + 1);
        }
    }
    /* The Python loop goes on: it needs the memo as a dict. */
    if (memo.dict == NULL && memo_make_dict(&memo) < 0)
        goto error;
    return Py_BuildValue("(nNNNi)", pos, stack, metastack, memo.dict, proto);
error:
    Py_XDECREF(stack);
    Py_XDECREF(metastack);
    memo_free_items(&memo);
    Py_XDECREF(memo.dict);
    return NULL;
}

PyDoc_STRVAR(set_opcodes_doc,
"set_opcodes(codes, highest_protocol)\n\n"
"Tell run() and load_pickle() the byte of each opcode they take (`codes` maps opcode\n"
"names to bytes) and the highest protocol a PROTO may declare.");

static PyObject *
set_opcodes(PyObject *module, PyObject *args)
{
    PyObject *codes;
    int highest;
    if (!PyArg_ParseTuple(args, "Oi:set_opcodes", &codes, &highest))
        return NULL;
    unsigned char table[256] = {0};
    for (size_t i = 0; i < KIND_COUNT; i++) {
        PyObject *code = PyMapping_GetItemString(codes, kind_names[i].name);
        if (code == NULL)
            return NULL;
        long byte = PyLong_AsLong(code);
        Py_DECREF(code);
        if (byte == -1 && PyErr_Occurred())
            return NULL;
        if (byte < 0 || byte > 255) {
            PyErr_Format(PyExc_ValueError, "opcode %s has byte %ld", kind_names[i].name, byte);
            return NULL;
        }
        table[byte] = kind_names[i].kind;
    }
    memcpy(kinds, table, sizeof kinds);
    highest_protocol = highest;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"run", (PyCFunction)(void (*)(void))run, METH_FASTCALL, run_doc},
    {"load_pickle", (PyCFunction)(void (*)(void))load_pickle, METH_FASTCALL, load_pickle_doc},
    {"set_opcodes", set_opcodes, METH_VARARGS, set_opcodes_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pstore.engine._speedups",
    .m_doc = "The unpickler's fast path for data opcodes (see Unpickler._run).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module_def);
}
