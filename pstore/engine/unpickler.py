"""The unpickler: pickle bytes (protocols 0 to 5) back to Python objects.

The API and the observable behaviour are the standard library's: for valid
input the result equals ``pickle.loads``; for malformed input the exception has
the same type as the one CPython's C unpickler raises, and its message (or, for
an exception raised by code the pickle called, a note) names the opcode and
its byte offset from the start of the pickle.

How it is fast in pure Python
-----------------------------
All the work of one ``load`` happens in :meth:`Unpickler._run`: the input is
one ``bytes`` object read with an integer position kept in a local variable,
and each opcode costs one call of a plain function, ``load_<name>(unpickler,
data, pos, stack) -> pos``, found in a 256-entry list (a call costs about as
much as two failed ``if`` comparisons, so a long ``elif`` chain loses). Only
the three most frequent opcodes (BINGET, MEMOIZE, SHORT_BINUNICODE) and the
ones that switch stack levels (MARK, POP, STOP) are handled in the loop itself,
and a MEMOIZE right after a SHORT_BINUNICODE is taken with it. Every opcode of
:mod:`.opcodes` is implemented exactly once: in the loop (``_INLINE``), or by a
handler in ``_HANDLERS`` or, for opcodes that take the items above a mark,
``_MARK_HANDLERS``. One shortcut: a leading PROTO and FRAME that are valid and
complete are skipped before the loop starts (else their handlers run, errors and all).

The C fast path: where ``_speedups`` is built, ``_run`` first hands the pickle to
``_speedups.run``, which runs the opcodes that build plain data on the same state
(``stack``, ``metastack``, ``memo``) and stops before the first opcode it leaves to
this loop: globals, persistent ids, anything that could run Python code, and any
error. The loop runs that opcode, errors included, and hands back to C after each
handler (and after a refill). Results and errors are the same with or without it.

Fixed-size reads are not bounds-checked: reading past the data raises
``IndexError``/``struct.error`` and only then does :func:`_arg_status` work
out which argument was truncated. Variable-length arguments are checked up
front, because slicing past the end of ``bytes`` does not fail. Handlers read
their argument before touching anything, so an opcode whose argument was
incomplete has changed nothing and can be run again once more data is read.

Marks: the stack is a list per mark level. MARK saves the current level on
``metastack`` and starts an empty one, so "do not pop below the mark" is
"do not pop an empty list": the loop's own pops need no check (an IndexError
raised in the loop itself is a stack underflow), handlers check explicitly.

File input: an ``io.BytesIO`` is read in place. Any other file is read into a
window; when an opcode finds its argument incomplete, the window is refilled
and the opcode restarted (nothing is changed before an argument is complete).
A seekable file is read ahead in chunks and sought back to just after STOP; a
non-seekable one is read exactly as far as each opcode needs (slow, but it
never reads past STOP). Declared lengths are never allocated up front: a
length that the data cannot supply fails as truncated.
"""

from __future__ import annotations

import codecs
import copyreg
import io
import math
import re
import struct
import sys
from collections.abc import Callable, Iterable
from pickle import UnpicklingError
from typing import Any

from .opcodes import (
    BY_CODE,
    BY_NAME,
    HIGHEST_PROTOCOL,
    LEN_INT4,
    LEN_UINT1,
    LEN_UINT4,
    LEN_UINT8,
    LINE,
    TWO_LINES,
    decode_utf8,
    python3_name,
)

__all__ = ["Unpickler", "load", "loads"]

_unpack_int4 = struct.Struct("<i").unpack_from
_unpack_uint2 = struct.Struct("<H").unpack_from
_unpack_uint4 = struct.Struct("<I").unpack_from
_unpack_uint8 = struct.Struct("<Q").unpack_from
_unpack_double = struct.Struct(">d").unpack_from

# The opcodes _run handles itself (as ints, what indexing ``bytes`` gives): the two most
# frequent ones, and those that change which stack level is current.
_BINGET = BY_NAME["BINGET"].byte
_MEMOIZE = BY_NAME["MEMOIZE"].byte
_MARK = BY_NAME["MARK"].byte
_POP = BY_NAME["POP"].byte
_STOP = BY_NAME["STOP"].byte
_SHORT_BINUNICODE = BY_NAME["SHORT_BINUNICODE"].byte
_PROTO = BY_NAME["PROTO"].byte
_FRAME = BY_NAME["FRAME"].byte
_INLINE = frozenset({"BINGET", "MEMOIZE", "SHORT_BINUNICODE", "MARK", "POP", "STOP"})

#: Opcodes that take the items above the top mark: their handlers get those items and the
#: level below the mark, instead of the current level.
_MARK_CONSUMERS = frozenset({"APPENDS", "SETITEMS", "ADDITEMS", "TUPLE", "LIST", "DICT",
                             "FROZENSET", "POP_MARK", "OBJ", "INST"})


_MISSING: Any = object()  # an attribute the file does not have
# How find_class refuses a name of a local object (3.13 changed CPython's wording).
_LOCAL_ATTRIBUTE = ("Can't get local attribute" if sys.version_info >= (3, 13)
                    else "Can't pickle local attribute")


# -- Internal signals from the loop and the handlers to _run's error handling ------------------

class _Truncated(Exception):
    """An argument runs past the end of the data read so far (maybe refillable)."""


class _Underflow(Exception):
    """An opcode needed more items than the current stack level holds."""


class _Bad(Exception):
    """Malformed input: _run raises ``kind(message)`` with the opcode and offset added."""

    def __init__(self, kind: type[BaseException], message: str) -> None:
        super().__init__(kind, message)
        self.kind = kind
        self.message = message

    def located(self, code: int, offset: int) -> BaseException:
        """The exception to raise, now that the opcode and its offset are known."""
        return self.kind(_located(self.message, code, offset))


def _need(stack: list, n: int) -> None:
    """Raise _Underflow unless the current stack level holds at least ``n`` items."""
    if len(stack) < n:
        raise _Underflow


# -- Reading arguments (for handlers; the inline code reads its own) ---------------------------

def _take(data: bytes, pos: int, n: int) -> int:
    """Return the end of an ``n``-byte argument at ``pos``, or raise _Truncated."""
    end = pos + n
    if end > len(data):
        raise _Truncated
    return end


def _line(data: bytes, pos: int) -> tuple[bytes, int]:
    """Return the line at ``pos`` without its newline, and the position after the newline."""
    nl = data.find(b"\n", pos)
    if nl < 0:
        raise _Truncated
    return data[pos:nl], nl + 1


def _nonempty_line(data: bytes, pos: int) -> tuple[bytes, int]:
    """Like :func:`_line`; an empty line is an error, as the C unpickler has it."""
    nl = data.find(b"\n", pos)
    if nl <= pos:
        if nl < 0:
            raise _Truncated
        raise _Bad(UnpicklingError, "pickle data was truncated (empty argument line)")
    return data[pos:nl], nl + 1


def _c_string(text: bytes) -> bytes:
    """``text`` up to its first NUL: the C unpickler parses numbers as C strings."""
    nul = text.find(b"\0")
    return text if nul < 0 else text[:nul]


def _c_int(text: bytes, base: int) -> int:
    """``int(text, base)`` as the C unpickler's PyLong_FromString has it."""
    try:
        return int(text, base)  # the same, for text without NUL
    except ValueError:
        pass
    text = _c_string(text)
    try:
        return int(text, base)
    except ValueError:
        # C's error message quotes the first 200 bytes, decoded: if that fails, so does C.
        text[:200].decode("utf-8")
        raise


# strtol(s, &end, 0) accepting the whole text: C's reading of INT (leading 0 means octal).
_STRTOL = re.compile(rb"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
# strtod as PyOS_string_to_double accepts it: no whitespace, no underscores, no hex.
_STRTOD = re.compile(rb"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                     rb"|inf|infinity|nan)", re.IGNORECASE)
_INF_TEXT = re.compile(rb"[+-]?inf", re.IGNORECASE)
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _text_to_int(text: bytes) -> int:
    """Parse INT's text as the C unpickler does: strtol first, then Python's int(text, 0)."""
    if text.isdigit() and text[0] != 0x30:  # plain decimal: strtol and int() agree
        return int(text)
    text = _c_string(text)
    if not text:  # strtol of an empty C string converts nothing, ends at the NUL: C takes 0
        return 0
    match = _STRTOL.fullmatch(text)
    if match:
        digits = match[2]
        value = int(digits, 8) if digits[:1] == b"0" and digits[1:2] not in (b"x", b"X") \
            else int(digits, 0)
        value = -value if match[1] == b"-" else value
        if _INT64_MIN <= value <= _INT64_MAX:
            return value
    try:
        return int(text, 0)
    except ValueError:
        raise _Bad(ValueError, "could not convert string to int") from None


def _text_to_float(text: bytes) -> float:
    """Parse FLOAT's text as the C unpickler does (PyOS_string_to_double)."""
    if not text.translate(None, b"0123456789.eE+-"):
        # Plain numeric text (what picklers write): float() and strtod agree, but for
        # overflow, which float() turns into inf and C refuses (left to the full check).
        try:
            value = float(text)
        except ValueError:
            raise _Bad(ValueError, "could not convert string to float") from None
        if math.isfinite(value):
            return value
    text = _c_string(text)
    if not _STRTOD.fullmatch(text):
        raise _Bad(ValueError, "could not convert string to float")
    value = float(text)
    if value in (float("inf"), float("-inf")) and not _INF_TEXT.match(text):
        raise _Bad(OverflowError, "value too large to convert to float")
    return value


def _arg_status(data: bytes, start: int) -> tuple[int, str]:
    """Whether the argument of the opcode at ``start`` lies within ``data``.

    Returns ``(missing, detail)``: ``missing`` is the number of bytes lacking,
    -1 if a newline-terminated argument has no newline yet, 0 if the argument
    is complete (or the opcode unknown). Raises OverflowError for a length
    that cannot exist (as _Bad), as the C unpickler does.
    """
    end = len(data)
    if start >= end:
        return 1, "expected an opcode"
    op = BY_CODE.get(data[start])
    if op is None:
        return 0, ""
    pos = start + 1
    size = op.arg.size
    if size == LINE or size == TWO_LINES:
        nl = data.find(b"\n", pos)
        if nl >= 0 and size == TWO_LINES:
            nl = data.find(b"\n", nl + 1)
        return (0, "") if nl >= 0 else (-1, "has no end of line")
    header = {LEN_UINT1: 1, LEN_INT4: 4, LEN_UINT4: 4, LEN_UINT8: 8}.get(size, 0)
    if op.name == "FRAME":
        header = 8
    if header:
        if pos + header > end:
            return pos + header - end, f"needs a {header}-byte length, {end - pos} bytes remain"
        # Lengths read as unsigned, as the C unpickler does (a negative LONG4 is refused earlier).
        length = int.from_bytes(data[pos:pos + header], "little")
        if length > sys.maxsize:
            raise _Bad(OverflowError,
                       f"length exceeds system's maximum size of {sys.maxsize} bytes")
        pos += header
        missing = pos + length - end
        return max(missing, 0), f"declares {length} bytes, {end - pos} remain"
    missing = pos + size - end
    return max(missing, 0), f"needs {size} bytes, {end - pos} remain"


# -- Handlers: one per opcode not handled inline. (unpickler, data, pos, stack) -> new pos ----
# They read their argument before anything else, and check the stack explicitly:
# _run takes an IndexError raised below it for an error of the code the pickle called.

def load_none(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    stack.append(None)
    return pos


def load_newtrue(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    stack.append(True)
    return pos


def load_newfalse(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    stack.append(False)
    return pos


def load_binint1(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    stack.append(data[pos])
    return pos + 1


def load_binint2(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    stack.append(_unpack_uint2(data, pos)[0])
    return pos + 2


def load_binint(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    stack.append(_unpack_int4(data, pos)[0])
    return pos + 4


def load_binfloat(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    stack.append(_unpack_double(data, pos)[0])
    return pos + 8


def load_binunicode(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    end = _take(data, pos + 4, _unpack_uint4(data, pos)[0])
    stack.append(decode_utf8(data[pos + 4:end]))
    return end


def load_short_binbytes(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    end = _take(data, pos + 1, data[pos])
    stack.append(data[pos + 1:end])
    return end


def load_binbytes(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    end = _take(data, pos + 4, _unpack_uint4(data, pos)[0])
    stack.append(data[pos + 4:end])  # the one copy of a big payload
    return end


def load_empty_list(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    stack.append([])
    return pos


def load_empty_dict(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    stack.append({})
    return pos


def load_empty_set(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    stack.append(set())
    return pos


def load_empty_tuple(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    stack.append(())
    return pos


def load_tuple1(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    if not stack:
        raise _Underflow
    stack[-1] = (stack[-1],)
    return pos


def load_tuple2(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    if len(stack) < 2:
        raise _Underflow
    stack[-2:] = [(stack[-2], stack[-1])]
    return pos


def load_tuple3(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    if len(stack) < 3:
        raise _Underflow
    stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
    return pos


def load_append(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    if len(stack) < 2:
        raise _Underflow
    item = stack.pop()
    target = stack[-1]
    if type(target) is list:
        target.append(item)
    else:
        _extend(target, [item])
    return pos


def load_setitem(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    if len(stack) < 3:
        raise _Underflow
    value = stack.pop()
    key = stack.pop()
    target = stack[-1]
    if type(target) is dict:
        target[key] = value
    else:
        _set_items(target, [key, value])
    return pos


def _memo_get(u: Unpickler, index: int, stack: list) -> None:
    try:
        stack.append(u.memo[index])
    except KeyError:
        raise _Bad(UnpicklingError, f"Memo value not found at index {index}") from None


def load_long_binget(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    _memo_get(u, _unpack_uint4(data, pos)[0], stack)
    return pos + 4


def load_binput(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    index = data[pos]
    if not stack:
        raise _Underflow
    u.memo[index] = stack[-1]
    return pos + 1


def load_long_binput(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    index = _unpack_uint4(data, pos)[0]
    if not stack:
        raise _Underflow
    u.memo[index] = stack[-1]
    return pos + 4


# Mark consumers: (unpickler, data, pos, items above the mark, level below it) -> new pos.
# _run checks that there is a mark, and drops the items' level after the handler ran.

def load_appends(u: Unpickler, data: bytes, pos: int, items: list, outer: list) -> int:
    if not outer:
        raise _Underflow
    target = outer[-1]
    if type(target) is list:
        target.extend(items)
    elif items:
        _extend(target, items)
    return pos


def load_setitems(u: Unpickler, data: bytes, pos: int, items: list, outer: list) -> int:
    if not outer:
        raise _Underflow
    target = outer[-1]
    if len(items) & 1:
        raise _Bad(UnpicklingError, "odd number of items for SETITEMS")
    if type(target) is dict:
        pairs = iter(items)     # zip of one iterator twice: key, value, with no slice copies
        target.update(zip(pairs, pairs, strict=False))
    elif items:
        _set_items(target, items)
    return pos


def load_additems(u: Unpickler, data: bytes, pos: int, items: list, outer: list) -> int:
    if not outer:
        raise _Underflow
    target = outer[-1]
    if type(target) is set:
        target.update(items)
    elif items:
        _add_items(target, items)
    return pos


def load_tuple(u: Unpickler, data: bytes, pos: int, items: list, outer: list) -> int:
    outer.append(tuple(items))
    return pos


def load_list(u: Unpickler, data: bytes, pos: int, items: list, outer: list) -> int:
    outer.append(items)
    return pos


def load_dict(u: Unpickler, data: bytes, pos: int, items: list, outer: list) -> int:
    if len(items) & 1:
        raise _Bad(UnpicklingError, "odd number of items for DICT")
    pairs = iter(items)
    outer.append(dict(zip(pairs, pairs, strict=False)))
    return pos


def load_frozenset(u: Unpickler, data: bytes, pos: int, items: list, outer: list) -> int:
    outer.append(frozenset(items))
    return pos


def load_pop_mark(u: Unpickler, data: bytes, pos: int, items: list, outer: list) -> int:
    return pos  # dropping the items' level is all there is to do


def load_obj(u: Unpickler, data: bytes, pos: int, items: list, outer: list) -> int:
    if not items:
        raise _Underflow
    outer.append(_instantiate(items[0], items[1:]))
    return pos


def load_inst(u: Unpickler, data: bytes, pos: int, items: list, outer: list) -> int:
    module, name, pos = _global_name(data, pos)
    outer.append(_instantiate(u.find_class(module, name), items))
    return pos


def load_int(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    text, pos = _nonempty_line(data, pos)
    if text == b"00" or text == b"01":
        stack.append(text == b"01")
    else:
        stack.append(_text_to_int(text))
    return pos


def load_long(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    text, pos = _nonempty_line(data, pos)
    if text.endswith(b"L"):
        text = text[:-1]
    stack.append(_c_int(text, 0))
    return pos


def load_long1(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    end = _take(data, pos + 1, data[pos])
    stack.append(int.from_bytes(data[pos + 1:end], "little", signed=True))
    return end


def load_long4(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    n = _unpack_int4(data, pos)[0]
    if n < 0:
        raise _Bad(UnpicklingError, "LONG pickle has negative byte count")
    end = _take(data, pos + 4, n)
    stack.append(int.from_bytes(data[pos + 4:end], "little", signed=True))
    return end


def load_float(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    text, pos = _nonempty_line(data, pos)
    stack.append(_text_to_float(text))
    return pos


def load_string(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    text, pos = _line(data, pos)
    if len(text) < 2 or text[0] != text[-1] or text[0] not in b"'\"":
        raise _Bad(UnpicklingError, "the STRING opcode argument must be quoted")
    stack.append(u._decode_8bit(codecs.escape_decode(text[1:-1])[0]))
    return pos


def load_binstring(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    # The length is read unsigned, like the C unpickler: a "negative" one is just too long.
    end = _take(data, pos + 4, _unpack_uint4(data, pos)[0])
    stack.append(u._decode_8bit(data[pos + 4:end]))
    return end


def load_short_binstring(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    end = _take(data, pos + 1, data[pos])
    stack.append(u._decode_8bit(data[pos + 1:end]))
    return end


def load_binbytes8(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    end = _take(data, pos + 8, _unpack_uint8(data, pos)[0])
    stack.append(data[pos + 8:end])
    return end


def load_bytearray8(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    end = _take(data, pos + 8, _unpack_uint8(data, pos)[0])
    stack.append(bytearray(memoryview(data)[pos + 8:end]))  # one copy, straight from the input
    return end


def load_next_buffer(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    if u._buffers is None:
        raise _Bad(UnpicklingError, "pickle stream refers to out-of-band data "
                                    "but no *buffers* argument was given")
    try:
        stack.append(next(u._buffers))  # the caller's object itself: zero-copy
    except StopIteration:
        raise _Bad(UnpicklingError, "not enough out-of-band buffers") from None
    return pos


def load_readonly_buffer(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 1)
    view = memoryview(stack[-1])
    if not view.readonly:
        stack[-1] = view.toreadonly()
    return pos


def load_unicode(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    text, pos = _line(data, pos)
    stack.append(str(text, "raw-unicode-escape"))
    return pos


def load_binunicode8(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    end = _take(data, pos + 8, _unpack_uint8(data, pos)[0])
    stack.append(decode_utf8(data[pos + 8:end]))
    return end


def load_dup(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 1)
    stack.append(stack[-1])
    return pos


def load_get(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    text, pos = _nonempty_line(data, pos)
    _memo_get(u, _c_int(text, 10), stack)
    return pos


def load_put(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    text, pos = _nonempty_line(data, pos)
    if not stack:  # checked before the index is parsed, as in C
        raise _Underflow
    index = _c_int(text, 10)
    if index < 0:
        raise _Bad(ValueError, "negative PUT argument")
    u.memo[index] = stack[-1]
    return pos


def _load_ext(u: Unpickler, code: int, stack: list) -> None:
    if code <= 0:
        raise _Bad(UnpicklingError, "EXT specifies code <= 0")
    # The cache would bypass an overridden find_class, so only the default one may use it.
    cacheable = type(u).find_class is Unpickler.find_class and "find_class" not in vars(u)
    # copyreg's registry of extension codes: private names, which typeshed does not list.
    if cacheable and code in copyreg._extension_cache:  # type: ignore[attr-defined]
        stack.append(copyreg._extension_cache[code])  # type: ignore[attr-defined]
        return
    key = copyreg._inverted_registry.get(code)  # type: ignore[attr-defined]
    if key is None:
        raise _Bad(ValueError, f"unregistered extension code {code}")
    if not (type(key) is tuple and len(key) == 2
            and type(key[0]) is str and type(key[1]) is str):
        raise _Bad(UnpicklingError, f"_inverted_registry[{code}] isn't a 2-tuple of strings")
    obj = u.find_class(*key)
    if cacheable:
        copyreg._extension_cache[code] = obj  # type: ignore[attr-defined]
    stack.append(obj)


def load_ext1(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    _load_ext(u, data[pos], stack)
    return pos + 1


def load_ext2(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    _load_ext(u, _unpack_uint2(data, pos)[0], stack)
    return pos + 2


def load_ext4(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    _load_ext(u, _unpack_int4(data, pos)[0], stack)
    return pos + 4


def _global_name(data: bytes, pos: int) -> tuple[str, str, int]:
    """Read GLOBAL's and INST's two lines: (module, name, position after them)."""
    module, pos = _nonempty_line(data, pos)
    module_name = module.decode("utf-8")  # before the second line is read, as in C
    name, pos = _nonempty_line(data, pos)
    return module_name, name.decode("utf-8"), pos


def load_global(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    module, name, pos = _global_name(data, pos)
    stack.append(u.find_class(module, name))
    return pos


def load_stack_global(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 2)
    name = stack.pop()
    module = stack.pop()
    if type(name) is not str or type(module) is not str:
        raise _Bad(UnpicklingError, "STACK_GLOBAL requires str")
    stack.append(u.find_class(module, name))
    return pos


def load_reduce(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 2)
    args = stack.pop()
    if not isinstance(args, tuple):
        raise _Bad(TypeError, "argument list must be a tuple")
    stack[-1] = stack[-1](*args)
    return pos


def load_build(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 2)
    state = stack.pop()
    inst = stack[-1]
    setstate = getattr(inst, "__setstate__", None)
    if setstate is not None:
        setstate(state)
        return pos
    slot_state = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slot_state = state
    # Like the C unpickler, an empty dict state still needs inst.__dict__ to exist.
    if state is not None:
        if not isinstance(state, dict):
            raise _Bad(UnpicklingError, "state is not a dictionary")
        inst_dict = inst.__dict__
        intern = sys.intern
        for key, value in state.items():
            inst_dict[intern(key) if type(key) is str else key] = value
    if slot_state is not None:
        if not isinstance(slot_state, dict):
            raise _Bad(UnpicklingError, "slot state is not a dictionary")
        for key, value in slot_state.items():
            setattr(inst, key, value)
    return pos


def load_newobj(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 2)
    args = stack.pop()
    cls = stack.pop()
    stack.append(_new(cls, args, {}, "NEWOBJ"))
    return pos


def load_newobj_ex(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 3)
    kwargs = stack.pop()
    args = stack.pop()
    cls = stack.pop()
    stack.append(_new(cls, args, kwargs, "NEWOBJ_EX"))
    return pos


def _new(cls: Any, args: Any, kwargs: Any, opname: str) -> Any:
    """``cls.__new__(cls, *args, **kwargs)`` after NEWOBJ's and NEWOBJ_EX's checks, in C's order."""
    if not isinstance(cls, type):
        raise _Bad(UnpicklingError,
                   f"{opname} class argument must be a type, not {type(cls).__name__}")
    if not isinstance(args, tuple):
        raise _Bad(UnpicklingError,
                   f"{opname} args argument must be a tuple, not {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise _Bad(UnpicklingError,
                   f"{opname} kwargs argument must be a dict, not {type(kwargs).__name__}")
    return cls.__new__(cls, *args, **kwargs)


def _instantiate(cls: Any, args: list) -> Any:
    """INST's and OBJ's object creation: a class with no arguments skips ``__init__``."""
    if not args and isinstance(cls, type) and not hasattr(cls, "__getinitargs__"):
        return cls.__new__(cls)  # type: ignore[call-overload]  # any class's own __new__
    return cls(*args)


def _extend(obj: Any, items: list) -> None:
    """APPEND(S) on something that is not exactly a list: its extend, else append per item."""
    extend = getattr(obj, "extend", None)
    if extend is not None:
        extend(items)
    else:
        append = obj.append
        for item in items:
            append(item)


def _set_items(obj: Any, items: list) -> None:
    """SETITEM(S) on something that is not exactly a dict: ``obj[key] = value`` per pair."""
    for i in range(0, len(items), 2):
        obj[items[i]] = items[i + 1]


def _add_items(obj: Any, items: list) -> None:
    """ADDITEMS on something that is not exactly a set: its add per item."""
    add = obj.add
    for item in items:
        add(item)


def load_proto(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    proto = data[pos]
    if proto > HIGHEST_PROTOCOL:
        raise _Bad(ValueError, f"unsupported pickle protocol: {proto}")
    u.proto = proto
    return pos + 1


def load_frame(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    # A frame only promises that its bytes are there; opcodes then read on as usual.
    size = _unpack_uint8(data, pos)[0]
    _take(data, pos + 8, size)
    return pos + 8


def load_persid(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    text, pos = _line(data, pos)
    try:
        pid = text.decode("ascii")
    except UnicodeDecodeError:
        raise _Bad(UnpicklingError, "persistent IDs in protocol 0 must be ASCII strings") from None
    stack.append(u.persistent_load(pid))
    return pos


def load_binpersid(u: Unpickler, data: bytes, pos: int, stack: list) -> int:
    _need(stack, 1)
    stack[-1] = u.persistent_load(stack[-1])
    return pos


Handler = Callable[["Unpickler", bytes, int, list], int]
MarkHandler = Callable[["Unpickler", bytes, int, list, list], int]
# Indexed by opcode byte; None where the other table, _run itself or no opcode has the byte.
_HANDLERS: list[Handler | None] = [None] * 256
_MARK_HANDLERS: list[MarkHandler | None] = [None] * 256
for _op in BY_CODE.values():
    if _op.name not in _INLINE:
        _table = _MARK_HANDLERS if _op.name in _MARK_CONSUMERS else _HANDLERS
        _table[_op.byte] = globals()[f"load_{_op.name.lower()}"]

#: The C fast path, ``run(data, pos, stack, metastack, memo, mark_limit) -> (pos, stack)``:
#: runs the data opcodes from ``pos`` and stops before the first one it leaves to the loop
#: (see _speedups.c), or None: set by :func:`pstore.engine.use_accelerators`, the one place
#: that picks the implementation.
_accelerate: Callable[[bytes, int, list, list, dict, int], tuple[int, list]] | None = None
#: Its whole-pickle entry, ``load_pickle(data, start, mark_limit)``: ``(object, end)`` for a
#: pickle it reads to its STOP, else ``(pos, stack, metastack, memo, proto)``, the state
#: where it stopped, for the loop to go on from; or None (set with ``_accelerate``).
_load_pickle: Callable[[bytes, int, int], tuple[Any, ...]] | None = None
del _op, _table


class Unpickler:
    """Read pickles from a binary file, like ``pickle.Unpickler``.

    ``file`` needs ``read`` and ``readline`` (else TypeError); they are looked up
    here, as CPython looks them up (``peek`` and ``readinto`` too), so an exception
    the file's attribute raises, other than AttributeError, propagates as it is.
    A subclass must call ``Unpickler.__init__``, else loading raises
    UnpicklingError. After :meth:`load` the file is positioned just after the
    pickle's STOP, so several pickles can be read one after another.
    ``encoding``/``errors`` decode Python 2 ``str`` objects
    (``encoding="bytes"`` keeps them as bytes); ``fix_imports`` maps Python 2
    module names for protocols below 3; ``buffers`` supplies, in order, the
    out-of-band buffers of a protocol 5 pickle, which are returned as they are
    (no copy). Subclasses may override :meth:`find_class` (every global goes
    through it) and :meth:`persistent_load`. ``memo`` persists across loads.
    """

    # The opcode handlers _run calls, and how many marks may be open at once: a
    # subclass (the restricted unpickler) replaces them, the loop itself is shared.
    _handlers: list[Handler | None] = _HANDLERS
    _mark_handlers: list[MarkHandler | None] = _MARK_HANDLERS
    _mark_limit: int = sys.maxsize

    def __init__(self, file: Any, *, fix_imports: bool = True, encoding: str = "ASCII",
                 errors: str = "strict", buffers: Iterable[Any] | None = None) -> None:
        # The file's attributes are looked up as CPython's unpickler looks them up, in its
        # order and with peek and readinto (which this one does not use): one that raises
        # AttributeError is missing, any other exception it raises propagates.
        getattr(file, "peek", None)
        getattr(file, "readinto", None)
        self._read = getattr(file, "read", _MISSING)
        self._readline = getattr(file, "readline", _MISSING)
        if self._read is _MISSING or self._readline is _MISSING:
            raise TypeError("file must have 'read' and 'readline' attributes")
        self._file = file
        self._setup(fix_imports, encoding, errors, buffers)

    def _setup(self, fix_imports: bool, encoding: str, errors: str,
               buffers: Iterable[Any] | None) -> None:
        self.fix_imports = fix_imports
        self.encoding = encoding
        self.errors = errors
        self._buffers = iter(buffers) if buffers is not None else None
        self.memo: dict[int, Any] = {}
        #: The protocol the current pickle's PROTO opcode declared (0 until one does).
        self.proto = 0

    def load(self) -> Any:
        """Read one pickle from the file and return the object it holds."""
        try:
            file = self._file
        except AttributeError:
            raise _not_initialised(self) from None
        if type(file) is io.BytesIO:
            # getvalue() shares a BytesIO's bytes when it was made from bytes: no copy.
            start = file.tell()
            value, pos, _ = self._run(file.getvalue(), start, start, None)
            file.seek(pos)
            return value
        refill = self._file_refill()
        value, pos, end = self._run(b"", 0, 0, refill)
        if end > pos:  # read ahead past STOP: give those bytes back
            file.seek(pos - end, io.SEEK_CUR)
        return value

    def load_bytes(self, data: bytes, buffers: Iterable[Any] | None = None) -> Any:
        """Return the object pickled at the start of ``data``, read in place; the file is not used.

        The pickle is read on its own, as :func:`loads` reads it: with an empty memo, and
        ``buffers`` as its out-of-band buffers. The unpickler's ``memo``, protocol and
        buffers are put back afterwards, so the objects of the pickle are not kept alive,
        and a ``persistent_load`` may call ``load_bytes`` of the same unpickler: one
        unpickler can serve any number of pickles, nested or not, with no setup per pickle.
        """
        return self.load_bytes_at(data, 0, buffers)[0]

    def load_bytes_at(self, data: bytes, start: int,
                      buffers: Iterable[Any] | None = None) -> tuple[Any, int]:
        """Like :meth:`load_bytes`, for the pickle at offset ``start`` of ``data``.

        Returns the object and the offset just past the pickle's STOP, where a next
        pickle of ``data`` may start. Offsets in error messages count from ``start``.
        """
        try:
            saved = self.memo, self.proto, self._buffers
        except AttributeError:
            raise _not_initialised(self) from None
        buffer_iterator = iter(buffers) if buffers is not None else None  # may raise: first
        resumed = None
        if _load_pickle is not None:
            # A pickle of plain data is read whole by one C call; any other goes on from
            # where C stopped, with the memo C made.
            state = _load_pickle(data, start, self._mark_limit)
            if len(state) == 2:
                return state
            pos, stack, metastack, memo, proto = state
            resumed = stack, metastack
        else:
            pos, memo, proto = start, {}, 0
        try:
            self.memo, self.proto, self._buffers = memo, proto, buffer_iterator
            value, end, _ = self._run(data, pos, start, None, resumed)
            return value, end
        finally:
            self.memo, self.proto, self._buffers = saved

    def find_class(self, module: str, name: str) -> Any:
        """Return the global ``module.name``; every global a pickle names is resolved here.

        Override it to restrict what a pickle may load. From protocol 4 on, ``name``
        may be a qualified name ("Outer.Inner"), followed one attribute at a time.
        Raises what importing raises, and AttributeError with CPython's message
        (naming ``name`` and the module) for a missing attribute or, from protocol 4
        on, a name of a local object ("<locals>").
        """
        sys.audit("pickle.find_class", module, name)
        if self.proto < 3 and self.fix_imports:
            module, name = python3_name(module, name)
        __import__(module)
        found = top = sys.modules[module]
        if self.proto >= 4:  # protocol 4 names are qualified names
            path = name.split(".")
            if "<locals>" in path:
                raise AttributeError(f"{_LOCAL_ATTRIBUTE} {name!r} on {top!r}")
        else:
            path = [name]
        try:
            for part in path:
                found = getattr(found, part)
        except AttributeError:  # CPython's message, whichever part is missing
            raise AttributeError(f"Can't get attribute {name!r} on {top!r}") from None
        return found

    def persistent_load(self, pid: Any) -> Any:
        """Return the object for a persistent id; by default, refuse (UnpicklingError)."""
        raise UnpicklingError("A load persistent id instruction was encountered, "
                              "but no persistent_load function was specified.")

    def _decode_8bit(self, raw: bytes) -> bytes | str:
        """A Python 2 ``str``: kept as bytes with encoding="bytes", else decoded."""
        if self.encoding == "bytes":
            return raw
        return raw.decode(self.encoding, self.errors)

    def _file_refill(self) -> Callable[[int], bytes]:
        """Make the function that reads more of a (non-BytesIO) file into the window."""
        read, readline = self._read, self._readline
        try:
            seekable = bool(self._file.seekable())
        except (AttributeError, OSError):
            seekable = False
        chunk_size = 1 << 16

        def refill(missing: int) -> bytes:
            if missing < 0:  # a line without its newline yet
                return read(chunk_size) if seekable else readline()
            want = max(missing, chunk_size) if seekable else missing
            # Bounded reads that grow with what arrived: a hostile length costs only what the
            # file really holds, a real one a few calls.
            parts = []
            got = 0
            while got < want:
                part = read(min(want - got, max(chunk_size, got)))
                if not part:
                    break
                parts.append(part)
                got += len(part)
            return b"".join(parts)

        return refill

    def _run(self, data: bytes, pos: int, origin: int,
             refill: Callable[[int], bytes] | None,
             resumed: tuple[list, list] | None = None) -> tuple[Any, int, int]:
        """Run the opcodes of ``data`` from ``pos`` up to STOP.

        ``origin`` is where the pickle starts in ``data`` (offsets in messages
        count from it). ``resumed``: the stack and metastack of a pickle read up to
        ``pos`` already (by ``_load_pickle``, which set ``proto`` and ``memo``); else
        the pickle starts at ``pos``. Returns (value, position after STOP, len(data)).
        """
        memo = self.memo
        handlers = self._handlers
        # Local names: cheaper to read in the loop than module globals.
        BINGET, MEMOIZE, SHORT_BINUNICODE, MARK = _BINGET, _MEMOIZE, _SHORT_BINUNICODE, _MARK
        mark_handlers = self._mark_handlers
        mark_limit = self._mark_limit
        end = len(data)
        stack: list
        metastack: list[list]
        if resumed is not None:
            stack, metastack = resumed
        else:
            self.proto = 0  # each pickle declares its own protocol (or has none: 0)
            stack, metastack = [], []
            # Nearly every pickle opens with PROTO and, from protocol 4 on, a FRAME: when
            # both are valid and the frame is all there, they are taken here, not by two
            # handler calls. Anything else is left to the loop, errors included.
            if pos + 11 <= end and data[pos] == _PROTO and data[pos + 1] <= HIGHEST_PROTOCOL:
                self.proto = data[pos + 1]
                pos += 2
                if data[pos] == _FRAME and pos + 9 + _unpack_uint8(data, pos + 1)[0] <= end:
                    pos += 9
        accelerate = _accelerate
        # C first (and again after a refill), then the loop from where it stopped; a
        # resumed pickle starts with the loop, at the opcode where C stopped.
        c_first = resumed is None
        start = pos
        code = -1
        while True:
            try:
                if c_first and accelerate is not None:
                    pos, stack = accelerate(data, pos, stack, metastack, memo, mark_limit)
                    # Where C took the whole pickle: its STOP, without a turn of the loop.
                    if pos < end and data[pos] == _STOP and stack:
                        return stack.pop(), pos + 1, end
                c_first = True
                while True:
                    start = pos
                    code = data[pos]
                    pos += 1
                    # The three most frequent opcodes first (MEMOIZE follows every string and
                    # container), then one call per opcode: a call costs about as much as two
                    # failed comparisons.
                    if code == SHORT_BINUNICODE:
                        after = pos + 1 + data[pos]
                        if after > end:
                            raise _Truncated
                        try:
                            value = data[pos + 1:after].decode()
                        except UnicodeDecodeError:
                            value = decode_utf8(data[pos + 1:after])
                        stack.append(value)
                        # Protocol 4+ picklers follow nearly every string with MEMOIZE:
                        # taken here, it costs no turn of the loop.
                        if after < end and data[after] == MEMOIZE:
                            memo[len(memo)] = value
                            after += 1
                        pos = after
                    elif code == MEMOIZE:
                        memo[len(memo)] = stack[-1]
                    elif code == BINGET:
                        try:
                            stack.append(memo[data[pos]])
                        except KeyError:
                            raise _Bad(UnpicklingError,
                                       f"Memo value not found at index {data[pos]}") from None
                        pos += 1
                    elif (handler := handlers[code]) is not None:
                        pos = handler(self, data, pos, stack)
                        # Back to C after each opcode it left to this loop.
                        if accelerate is not None:
                            pos, stack = accelerate(data, pos, stack, metastack, memo, mark_limit)
                    elif code == MARK:
                        if len(metastack) >= mark_limit:
                            raise _Bad(UnpicklingError, f"more than {mark_limit} nested marks")
                        metastack.append(stack)
                        stack = []
                    elif (mark_handler := mark_handlers[code]) is not None:
                        if not metastack:
                            raise _Bad(UnpicklingError, "could not find MARK")
                        pos = mark_handler(self, data, pos, stack, metastack[-1])
                        stack = metastack.pop()
                    elif code == _STOP:
                        return stack.pop(), pos, end
                    elif code == _POP:
                        if stack:
                            stack.pop()
                        else:  # an empty level: POP removes the mark itself
                            stack = metastack.pop()
                    else:
                        raise _Bad(UnpicklingError, f"invalid load key, {chr(code)!r}")
            except (IndexError, struct.error, _Truncated, _Underflow) as exc:
                try:
                    missing, detail = _arg_status(data, start)
                except _Bad as bad:
                    raise bad.kind(_located(bad.message, code, start - origin)) from None
                if missing == 0:
                    # Arguments are read before anything else runs, so a complete argument
                    # means the stack is at fault -- unless the error came from deeper down,
                    # out of code the pickle called.
                    if not isinstance(exc, (_Truncated, _Underflow)) \
                            and exc.__traceback__.tb_next is not None:  # type: ignore[union-attr]
                        _add_location(exc, code, start - origin)
                        raise
                    message = "unexpected MARK found" if metastack else "unpickling stack underflow"
                    raise UnpicklingError(_located(message, code, start - origin)) from None
                more = refill(missing) if refill is not None else b""
                if not more:
                    offset = start - origin
                    if start >= end:
                        raise EOFError(f"Ran out of input: no opcode at offset {offset}"
                                       " (the pickle has no STOP)") from None
                    raise UnpicklingError(
                        _located("pickle data was truncated", code, offset) + " " + detail
                    ) from None
                # Keep the window from the interrupted opcode on, and run that opcode again.
                data = data[start:] + more
                origin -= start
                pos = 0
                end = len(data)
            except _Bad as exc:
                raise exc.located(code, start - origin) from None
            except Exception as exc:
                _add_location(exc, code, start - origin)
                raise


def _not_initialised(unpickler: Unpickler) -> UnpicklingError:
    return UnpicklingError(f"Unpickler.__init__() was not called by "
                           f"{type(unpickler).__name__}.__init__()")


def _opname(code: int) -> str:
    op = BY_CODE.get(code)
    return op.name if op is not None else f"opcode {code:#04x}"


def _located(message: str, code: int, offset: int) -> str:
    return f"{message}: {_opname(code)} at offset {offset}"


def _add_location(exc: BaseException, code: int, offset: int) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(f"while unpickling {_opname(code)} at offset {offset}")


def load(file: Any, *, fix_imports: bool = True, encoding: str = "ASCII",
         errors: str = "strict", buffers: Iterable[Any] | None = None) -> Any:
    """Read one pickle from ``file`` (see :class:`Unpickler`) and return its object."""
    return Unpickler(file, fix_imports=fix_imports, encoding=encoding, errors=errors,
                     buffers=buffers).load()


def loads(data: Any, /, *, fix_imports: bool = True, encoding: str = "ASCII",
          errors: str = "strict", buffers: Iterable[Any] | None = None) -> Any:
    """Return the object pickled in ``data`` (any bytes-like object).

    A ``bytes`` object is read in place; other bytes-like objects are copied
    once into ``bytes`` first. Data after the STOP opcode is ignored.
    """
    if type(data) is not bytes:
        data = bytes(memoryview(data))
    unpickler = Unpickler.__new__(Unpickler)
    unpickler._setup(fix_imports, encoding, errors, None)
    return unpickler.load_bytes_at(data, 0, buffers)[0]
