"""The pickle opcodes of protocols 0 to 5, as one table.

Everything in :mod:`pstore.engine` that needs to know an opcode reads it from
:data:`OPCODES`: the module constants below (``MARK``, ``BINUNICODE``, ...), the
pickler's output, the unpickler's dispatch, the disassembler and the tests.

The facts of the format that go with the table live here too, defined once for the
pickler, the unpickler and the tools: the protocol constants, how UTF-8 text arguments
decode, and the Python 2 names of globals in pickles of protocols 0 to 2.

The format is described in PEP 307 (protocol 2), PEP 3154 (protocol 4),
PEP 574 (protocol 5) and in the opcode documentation of the standard library's
``pickletools``; the test suite checks this table against the latter.
"""

from __future__ import annotations

import pickle as _stdlib_pickle  # DEFAULT_PROTOCOL only
from _compat_pickle import (
    IMPORT_MAPPING,
    NAME_MAPPING,
    REVERSE_IMPORT_MAPPING,
    REVERSE_NAME_MAPPING,
)
from typing import TYPE_CHECKING, NamedTuple

__all__ = ["ArgKind", "Opcode", "OPCODES", "BY_CODE", "BY_NAME", "HIGHEST_PROTOCOL",
           "DEFAULT_PROTOCOL", "FRAME_SIZE_TARGET", "FRAME_SIZE_MIN", "BATCH_SIZE",
           "decode_utf8", "python2_name", "python3_name"]

# How an argument's length is found when it is not a fixed number of bytes.
LINE = -1           # ends at the next b"\n" (the newline is part of the argument)
TWO_LINES = -2      # two newline-terminated lines (module, then name)
LEN_UINT1 = -3      # a 1-byte unsigned length, then that many bytes
LEN_INT4 = -4       # a 4-byte little-endian signed length, then that many bytes
LEN_UINT4 = -5      # a 4-byte little-endian unsigned length, then that many bytes
LEN_UINT8 = -6      # an 8-byte little-endian unsigned length, then that many bytes


# NamedTuples, not dataclasses: importing dataclasses (and the inspect module it needs)
# would cost every ``import pstore`` several milliseconds.
class ArgKind(NamedTuple):
    """How an opcode's argument is laid out in the stream."""

    name: str   #: the name pickletools gives this kind of argument
    size: int   #: a fixed size in bytes (>= 0), or one of LINE, TWO_LINES, LEN_*
    doc: str


ARG_NONE = ArgKind("none", 0, "no argument")
ARG_UINT1 = ArgKind("uint1", 1, "one unsigned byte")
ARG_UINT2 = ArgKind("uint2", 2, "2-byte little-endian unsigned integer")
ARG_INT4 = ArgKind("int4", 4, "4-byte little-endian signed integer")
ARG_UINT4 = ArgKind("uint4", 4, "4-byte little-endian unsigned integer")
ARG_UINT8 = ArgKind("uint8", 8, "8-byte little-endian unsigned integer")
ARG_FLOAT8 = ArgKind("float8", 8, "8-byte big-endian IEEE 754 double")
ARG_DECIMALNL_SHORT = ArgKind("decimalnl_short", LINE, "decimal integer text, newline")
ARG_DECIMALNL_LONG = ArgKind("decimalnl_long", LINE, "decimal integer text, optional 'L', newline")
ARG_FLOATNL = ArgKind("floatnl", LINE, "float text as repr() writes it, newline")
ARG_STRINGNL = ArgKind("stringnl", LINE, "quoted, backslash-escaped 8-bit string, newline")
ARG_STRINGNL_NOESCAPE = ArgKind("stringnl_noescape", LINE, "ASCII text, newline")
ARG_STRINGNL_NOESCAPE_PAIR = ArgKind("stringnl_noescape_pair", TWO_LINES,
                                 "module name, newline, qualified name, newline")
ARG_UNICODESTRINGNL = ArgKind("unicodestringnl", LINE, "raw-unicode-escape text, newline")
ARG_STRING1 = ArgKind("string1", LEN_UINT1, "8-bit string, 1-byte length")
ARG_STRING4 = ArgKind("string4", LEN_INT4, "8-bit string, 4-byte signed length")
ARG_BYTES1 = ArgKind("bytes1", LEN_UINT1, "bytes, 1-byte length")
ARG_BYTES4 = ArgKind("bytes4", LEN_UINT4, "bytes, 4-byte length")
ARG_BYTES8 = ArgKind("bytes8", LEN_UINT8, "bytes, 8-byte length")
ARG_BYTEARRAY8 = ArgKind("bytearray8", LEN_UINT8, "bytearray contents, 8-byte length")
ARG_UNICODESTRING1 = ArgKind("unicodestring1", LEN_UINT1, "UTF-8 text, 1-byte length")
ARG_UNICODESTRING4 = ArgKind("unicodestring4", LEN_UINT4, "UTF-8 text, 4-byte length")
ARG_UNICODESTRING8 = ArgKind("unicodestring8", LEN_UINT8, "UTF-8 text, 8-byte length")
ARG_LONG1 = ArgKind("long1", LEN_UINT1, "little-endian two's complement integer, 1-byte length")
ARG_LONG4 = ArgKind("long4", LEN_INT4, "little-endian two's complement integer, 4-byte length")


class Opcode(NamedTuple):
    """One row of the table: what a pickle opcode is and does."""

    name: str        #: e.g. "BINUNICODE"; the pickler and unpickler handlers are named after it
    code: bytes      #: the one-byte code
    arg: ArgKind     #: how its argument is encoded
    proto: int       #: the protocol that introduced it
    stack: str       #: stack effect, "before -> after"
    doc: str         #: what it does

    @property
    def byte(self) -> int:
        """The code as an integer, as indexing a ``bytes`` object gives it."""
        return self.code[0]


OPCODES: tuple[Opcode, ...] = (
    # Integers and booleans.
    Opcode("INT", b"I", ARG_DECIMALNL_SHORT, 0, "-> int_or_bool",
        "Push an int; the texts '00' and '01' mean False and True."),
    Opcode("BININT", b"J", ARG_INT4, 1, "-> int", "Push a 4-byte signed int."),
    Opcode("BININT1", b"K", ARG_UINT1, 1, "-> int", "Push a 1-byte unsigned int."),
    Opcode("BININT2", b"M", ARG_UINT2, 1, "-> int", "Push a 2-byte unsigned int."),
    Opcode("LONG", b"L", ARG_DECIMALNL_LONG, 0, "-> int", "Push an int written as decimal text."),
    Opcode("LONG1", b"\x8a", ARG_LONG1, 2, "-> int", "Push an int of up to 255 bytes."),
    Opcode("LONG4", b"\x8b", ARG_LONG4, 2, "-> int", "Push an int of any size."),
    # 8-bit strings (Python 2's str): bytes or str depending on the unpickler's encoding.
    Opcode("STRING", b"S", ARG_STRINGNL, 0, "-> bytes_or_str", "Push a quoted 8-bit string."),
    Opcode("BINSTRING", b"T", ARG_STRING4, 1, "-> bytes_or_str",
           "Push an 8-bit string, 4-byte length."),
    Opcode("SHORT_BINSTRING", b"U", ARG_STRING1, 1, "-> bytes_or_str",
        "Push an 8-bit string, 1-byte length."),
    # Bytes and buffers.
    Opcode("BINBYTES", b"B", ARG_BYTES4, 3, "-> bytes", "Push bytes, 4-byte length."),
    Opcode("SHORT_BINBYTES", b"C", ARG_BYTES1, 3, "-> bytes", "Push bytes, 1-byte length."),
    Opcode("BINBYTES8", b"\x8e", ARG_BYTES8, 4, "-> bytes", "Push bytes, 8-byte length."),
    Opcode("BYTEARRAY8", b"\x96", ARG_BYTEARRAY8, 5, "-> bytearray", "Push a bytearray."),
    Opcode("NEXT_BUFFER", b"\x97", ARG_NONE, 5, "-> buffer",
        "Push the next out-of-band buffer."),
    Opcode("READONLY_BUFFER", b"\x98", ARG_NONE, 5, "buffer -> buffer",
        "Make the buffer on top of the stack read-only."),
    # Constants.
    Opcode("NONE", b"N", ARG_NONE, 0, "-> None", "Push None."),
    Opcode("NEWTRUE", b"\x88", ARG_NONE, 2, "-> bool", "Push True."),
    Opcode("NEWFALSE", b"\x89", ARG_NONE, 2, "-> bool", "Push False."),
    # Text.
    Opcode("UNICODE", b"V", ARG_UNICODESTRINGNL, 0, "-> str",
        "Push a str written with raw-unicode-escape."),
    Opcode("SHORT_BINUNICODE", b"\x8c", ARG_UNICODESTRING1, 4, "-> str",
        "Push a UTF-8 str, 1-byte length."),
    Opcode("BINUNICODE", b"X", ARG_UNICODESTRING4, 1, "-> str", "Push a UTF-8 str, 4-byte length."),
    Opcode("BINUNICODE8", b"\x8d", ARG_UNICODESTRING8, 4, "-> str",
           "Push a UTF-8 str, 8-byte length."),
    # Floats.
    Opcode("FLOAT", b"F", ARG_FLOATNL, 0, "-> float", "Push a float written as text."),
    Opcode("BINFLOAT", b"G", ARG_FLOAT8, 1, "-> float", "Push an 8-byte big-endian float."),
    # Lists.
    Opcode("EMPTY_LIST", b"]", ARG_NONE, 1, "-> list", "Push an empty list."),
    Opcode("APPEND", b"a", ARG_NONE, 0, "list, any -> list", "Append to the list below."),
    Opcode("APPENDS", b"e", ARG_NONE, 1, "list, mark, any* -> list",
        "Extend the list below the mark with the items above it."),
    Opcode("LIST", b"l", ARG_NONE, 0, "mark, any* -> list",
           "Build a list from the items above the mark."),
    # Tuples.
    Opcode("EMPTY_TUPLE", b")", ARG_NONE, 1, "-> tuple", "Push the empty tuple."),
    Opcode("TUPLE", b"t", ARG_NONE, 0, "mark, any* -> tuple",
        "Build a tuple from the items above the mark."),
    Opcode("TUPLE1", b"\x85", ARG_NONE, 2, "any -> tuple", "Build a 1-tuple from the top item."),
    Opcode("TUPLE2", b"\x86", ARG_NONE, 2, "any, any -> tuple",
           "Build a 2-tuple from the top items."),
    Opcode("TUPLE3", b"\x87", ARG_NONE, 2, "any, any, any -> tuple",
        "Build a 3-tuple from the top items."),
    # Dicts.
    Opcode("EMPTY_DICT", b"}", ARG_NONE, 1, "-> dict", "Push an empty dict."),
    Opcode("DICT", b"d", ARG_NONE, 0, "mark, (key, value)* -> dict",
        "Build a dict from the pairs above the mark."),
    Opcode("SETITEM", b"s", ARG_NONE, 0, "dict, key, value -> dict",
           "Set one item of the dict below."),
    Opcode("SETITEMS", b"u", ARG_NONE, 1, "dict, mark, (key, value)* -> dict",
        "Set the pairs above the mark in the dict below it."),
    # Sets.
    Opcode("EMPTY_SET", b"\x8f", ARG_NONE, 4, "-> set", "Push an empty set."),
    Opcode("ADDITEMS", b"\x90", ARG_NONE, 4, "set, mark, any* -> set",
        "Add the items above the mark to the set below it."),
    Opcode("FROZENSET", b"\x91", ARG_NONE, 4, "mark, any* -> frozenset",
        "Build a frozenset from the items above the mark."),
    # Stack manipulation.
    Opcode("POP", b"0", ARG_NONE, 0, "any ->", "Discard the top item (or the top mark)."),
    Opcode("DUP", b"2", ARG_NONE, 0, "any -> any, any", "Push the top item again."),
    Opcode("MARK", b"(", ARG_NONE, 0, "-> mark", "Push a mark."),
    Opcode("POP_MARK", b"1", ARG_NONE, 1, "mark, any* ->",
           "Discard everything down to the top mark."),
    # The memo.
    Opcode("GET", b"g", ARG_DECIMALNL_SHORT, 0, "-> any", "Push a memo entry (index as text)."),
    Opcode("BINGET", b"h", ARG_UINT1, 1, "-> any", "Push a memo entry (1-byte index)."),
    Opcode("LONG_BINGET", b"j", ARG_UINT4, 1, "-> any", "Push a memo entry (4-byte index)."),
    Opcode("PUT", b"p", ARG_DECIMALNL_SHORT, 0, "any -> any",
           "Store the top item in the memo (text index)."),
    Opcode("BINPUT", b"q", ARG_UINT1, 1, "any -> any",
           "Store the top item in the memo (1-byte index)."),
    Opcode("LONG_BINPUT", b"r", ARG_UINT4, 1, "any -> any",
        "Store the top item in the memo (4-byte index)."),
    Opcode("MEMOIZE", b"\x94", ARG_NONE, 4, "any -> any",
        "Store the top item in the memo at the next free index."),
    # Globals and the extension registry.
    Opcode("EXT1", b"\x82", ARG_UINT1, 2, "-> any",
           "Push the global registered under a 1-byte code."),
    Opcode("EXT2", b"\x83", ARG_UINT2, 2, "-> any",
           "Push the global registered under a 2-byte code."),
    Opcode("EXT4", b"\x84", ARG_INT4, 2, "-> any",
           "Push the global registered under a 4-byte code."),
    Opcode("GLOBAL", b"c", ARG_STRINGNL_NOESCAPE_PAIR, 0, "-> any",
        "Push module.name, resolved by find_class."),
    Opcode("STACK_GLOBAL", b"\x93", ARG_NONE, 4, "str, str -> any",
        "Push module.name taken from the stack, resolved by find_class."),
    # Building objects.
    Opcode("REDUCE", b"R", ARG_NONE, 0, "callable, tuple -> any", "Call callable(*tuple)."),
    Opcode("BUILD", b"b", ARG_NONE, 0, "any, state -> any",
        "Set the object's state: __setstate__, or its __dict__ and slots."),
    Opcode("INST", b"i", ARG_STRINGNL_NOESCAPE_PAIR, 0, "mark, any* -> any",
        "Instantiate module.name with the items above the mark (protocol 0 classes)."),
    Opcode("OBJ", b"o", ARG_NONE, 1, "mark, class, any* -> any",
        "Instantiate the class above the mark with the items after it."),
    Opcode("NEWOBJ", b"\x81", ARG_NONE, 2, "class, tuple -> any",
           "Call class.__new__(class, *tuple)."),
    Opcode("NEWOBJ_EX", b"\x92", ARG_NONE, 4, "class, tuple, dict -> any",
        "Call class.__new__(class, *tuple, **dict)."),
    # Framing and control.
    Opcode("PROTO", b"\x80", ARG_UINT1, 2, "->", "Declare the protocol version."),
    Opcode("STOP", b".", ARG_NONE, 0, "any ->", "End of pickle: the top item is the result."),
    Opcode("FRAME", b"\x95", ARG_UINT8, 4, "->", "The next N bytes are a frame of whole opcodes."),
    # Persistent ids.
    Opcode("PERSID", b"P", ARG_STRINGNL_NOESCAPE, 0, "-> any",
        "Push persistent_load(text id)."),
    Opcode("BINPERSID", b"Q", ARG_NONE, 1, "any -> any", "Push persistent_load(top item)."),
)

BY_CODE: dict[int, Opcode] = {op.byte: op for op in OPCODES}
BY_NAME: dict[str, Opcode] = {op.name: op for op in OPCODES}

# The module constants: MARK = b"(", BINUNICODE = b"X", and so on, one per row.
globals().update({op.name: op.code for op in OPCODES})
if TYPE_CHECKING:
    # For type checkers: the names just made (STOP, MARK, ...) are the opcodes' bytes.
    def __getattr__(name: str) -> bytes: ...
__all__ += [op.name for op in OPCODES]

#: The pickler closes a frame at the first opcode boundary past this many bytes.
FRAME_SIZE_TARGET = 64 * 1024
#: A frame smaller than this is not worth its 9-byte header and is written unframed.
FRAME_SIZE_MIN = 4
#: Items of a list, dict or set are written in batches of this many (APPENDS, SETITEMS, ADDITEMS).
BATCH_SIZE = 1000

#: The newest protocol: the highest that introduced an opcode of the table (5).
HIGHEST_PROTOCOL: int = max(op.proto for op in OPCODES)
#: The running Python's default protocol (4 on Python 3.8 to 3.13), what protocol=None means.
DEFAULT_PROTOCOL: int = _stdlib_pickle.DEFAULT_PROTOCOL


def decode_utf8(raw: bytes) -> str:
    """The text of a UTF-8 argument (BINUNICODE and the like).

    CPython's pickler writes lone surrogates as they are ('surrogatepass'), so they
    decode back; anything else that is not UTF-8 raises UnicodeDecodeError.
    """
    try:
        return raw.decode()  # the strict default is the decoder's fastest path
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogatepass")


def python3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 global a Python 2 ``(module, name)`` means (``fix_imports`` when loading
    protocols 0 to 2); names Python 2 and 3 share come back unchanged."""
    mapped = NAME_MAPPING.get((module, name))
    if mapped is not None:
        return mapped
    return IMPORT_MAPPING.get(module, module), name


def python2_name(module: str, name: str) -> tuple[str, str]:
    """The name Python 2 knows a Python 3 global by (``fix_imports`` when writing protocols
    0 to 2): the inverse of :func:`python3_name`."""
    mapped = REVERSE_NAME_MAPPING.get((module, name))
    if mapped is not None:
        return mapped
    return REVERSE_IMPORT_MAPPING.get(module, module), name
