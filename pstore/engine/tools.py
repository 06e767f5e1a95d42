"""Reading a pickle without running it: a disassembler, and the globals it would import.

Nothing here imports a module a pickle names, calls anything or builds any
object other than an opcode's argument. Every opcode is looked up in
:data:`pstore.engine.opcodes.OPCODES`, and its argument is decoded according to
its :class:`~pstore.engine.opcodes.ArgKind`.

Malformed input -- an unknown opcode, a truncated or undecodable argument, no
STOP -- raises ``pickle.UnpicklingError`` with the byte offset of the opcode at
fault. A declared length larger than the rest of the data is refused before
anything of that size is allocated.
"""

from __future__ import annotations

import codecs
import copyreg
import struct
from collections.abc import Callable, Iterator
from pickle import UnpicklingError
from typing import Any, NamedTuple

from . import opcodes
from .opcodes import ArgKind, Opcode, decode_utf8, python3_name

__all__ = ["Instruction", "iter_instructions", "disassemble", "globals_of"]


class Instruction(NamedTuple):
    """One opcode of a pickle.

    ``argument`` is the decoded argument, or None for opcodes without one:
    an int (or bool, for INT's '00'/'01'), float, str, bytes (the 8-bit
    strings of STRING, BINSTRING and SHORT_BINSTRING too), bytearray, or a
    ``(module, name)`` pair of str for GLOBAL and INST.
    """

    offset: int       #: where the opcode byte is in the data
    opcode: Opcode    #: its row of the opcode table
    argument: Any


# -- argument decoding, keyed by ArgKind ------------------------------------------------------

def _decimal_short(text: bytes) -> int:
    # INT writes False and True as "00" and "01" (protocols 0 and 1).
    if text == b"00":
        return False
    if text == b"01":
        return True
    return int(text)


def _decimal_long(text: bytes) -> int:
    return int(text[:-1] if text.endswith(b"L") else text)


def _quoted_string(text: bytes) -> bytes:
    if len(text) < 2 or text[0] != text[-1] or text[:1] not in (b"'", b'"'):
        raise ValueError("the STRING argument is not quoted")
    return codecs.escape_decode(text[1:-1])[0]


def _signed_int(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True)


#: The struct format of each fixed-size argument.
_FIXED: dict[str, struct.Struct] = {
    "uint1": struct.Struct("<B"), "uint2": struct.Struct("<H"), "int4": struct.Struct("<i"),
    "uint4": struct.Struct("<I"), "uint8": struct.Struct("<Q"), "float8": struct.Struct(">d"),
}
#: The struct format of the length prefix, for each LEN_* layout.
_LENGTH_PREFIX: dict[int, struct.Struct] = {
    opcodes.LEN_UINT1: struct.Struct("<B"), opcodes.LEN_INT4: struct.Struct("<i"),
    opcodes.LEN_UINT4: struct.Struct("<I"), opcodes.LEN_UINT8: struct.Struct("<Q"),
}
#: How the bytes of a line (without its newline) or of a length-prefixed payload decode.
_DECODE: dict[str, Callable[[bytes], Any]] = {
    "decimalnl_short": _decimal_short,
    "decimalnl_long": _decimal_long,
    "floatnl": float,
    "stringnl": _quoted_string,
    "stringnl_noescape": decode_utf8,
    "stringnl_noescape_pair": decode_utf8,
    "unicodestringnl": lambda data: data.decode("raw-unicode-escape"),
    "string1": bytes, "string4": bytes,
    "bytes1": bytes, "bytes4": bytes, "bytes8": bytes,
    "bytearray8": bytearray,
    "unicodestring1": decode_utf8, "unicodestring4": decode_utf8,
    "unicodestring8": decode_utf8,
    "long1": _signed_int, "long4": _signed_int,
}
#: The kinds whose argument is text (str), and those that are 8-bit strings (bytes).
_TEXT_KINDS = frozenset(("unicodestringnl", "unicodestring1", "unicodestring4", "unicodestring8"))
_EIGHT_BIT_KINDS = frozenset(("stringnl", "string1", "string4"))


def _read_line(data: bytes, start: int) -> tuple[bytes, int]:
    """The line at ``start`` without its newline, and the offset after the newline."""
    end = data.find(b"\n", start)
    if end < 0:
        raise ValueError("the line has no terminating newline")
    return data[start:end], end + 1


_Reader = Callable[[bytes, int], tuple[Any, int]]


def _make_reader(kind: ArgKind) -> _Reader:
    """A function reading an argument of ``kind`` at an offset: (argument, offset after it).

    It raises ValueError (or a subclass) if the data is truncated or malformed.
    """
    size = kind.size
    if size == 0:
        return lambda data, start: (None, start)
    fixed = _FIXED.get(kind.name)
    if fixed is not None:
        unpack = fixed.unpack_from

        def read_fixed(data: bytes, start: int) -> tuple[Any, int]:
            if len(data) - start < size:
                raise ValueError(f"{kind.name} needs {size} bytes, {len(data) - start} remain")
            return unpack(data, start)[0], start + size
        return read_fixed
    decode = _DECODE[kind.name]
    if size == opcodes.LINE:
        def read_line(data: bytes, start: int) -> tuple[Any, int]:
            line, end = _read_line(data, start)
            return decode(line), end
        return read_line
    if size == opcodes.TWO_LINES:
        def read_two_lines(data: bytes, start: int) -> tuple[Any, int]:
            module, middle = _read_line(data, start)
            name, end = _read_line(data, middle)
            return (decode(module), decode(name)), end
        return read_two_lines
    prefix = _LENGTH_PREFIX[size]

    def read_counted(data: bytes, start: int) -> tuple[Any, int]:
        if len(data) - start < prefix.size:
            raise ValueError(f"{kind.name}'s length needs {prefix.size} bytes, "
                             f"{len(data) - start} remain")
        length = prefix.unpack_from(data, start)[0]
        begin = start + prefix.size
        if length < 0:
            raise ValueError(f"{kind.name} declares a negative length {length}")
        if length > len(data) - begin:
            raise ValueError(f"{kind.name} declares {length} bytes, {len(data) - begin} remain")
        return decode(data[begin:begin + length]), begin + length
    return read_counted


#: For each opcode byte: the opcode, and the reader of its argument.
_READERS: dict[int, tuple[Opcode, _Reader]] = {
    opcode.byte: (opcode, _make_reader(opcode.arg)) for opcode in opcodes.OPCODES}


# -- walking the opcodes ----------------------------------------------------------------------

_STOP = opcodes.BY_NAME["STOP"]
_FRAME = opcodes.BY_NAME["FRAME"]
_MEMOIZE = opcodes.BY_NAME["MEMOIZE"]
# Opcodes are looked up by name: hashing an Opcode hashes all its fields.
_MEMO_PUTS = frozenset(("PUT", "BINPUT", "LONG_BINPUT"))
_MEMO_GETS = frozenset(("GET", "BINGET", "LONG_BINGET"))


def iter_instructions(data: Any) -> Iterator[Instruction]:
    """Yield the instructions of the pickle in ``data`` (a bytes-like object), up to its STOP.

    Like ``pickletools.genops``, it stops after STOP and ignores what follows; a
    FRAME is yielded as an instruction like any other (its argument is the frame
    size). Raises ``pickle.UnpicklingError`` naming the offset of the first
    opcode that is unknown or whose argument is truncated or malformed, or of the
    end of the data if there is no STOP.
    """
    if not isinstance(data, bytes):
        data = memoryview(data).tobytes()
    readers = _READERS
    position = 0
    end = len(data)
    while position < end:
        entry = readers.get(data[position])
        if entry is None:
            raise UnpicklingError(f"unknown opcode {data[position]:#04x} at offset {position}")
        opcode, read = entry
        try:
            argument, following = read(data, position + 1)
        except ValueError as error:  # includes UnicodeDecodeError
            raise UnpicklingError(f"{opcode.name} at offset {position}: bad argument: "
                                  f"{error}") from None
        if opcode is _FRAME and argument > end - following:
            raise UnpicklingError(f"FRAME at offset {position}: declares {argument} bytes, "
                                  f"{end - following} remain")
        yield Instruction(position, opcode, argument)
        if opcode is _STOP:
            return
        position = following
    raise UnpicklingError(f"pickle ends at offset {end} without a STOP opcode")


_ARGUMENT_WIDTH = 60


def _shortened_repr(argument: Any) -> str:
    """repr of an argument, shortened past _ARGUMENT_WIDTH characters for long payloads."""
    text = repr(argument)
    if len(text) <= _ARGUMENT_WIDTH or not hasattr(argument, "__len__"):
        return text
    return f"{repr(argument[:_ARGUMENT_WIDTH // 2])}... ({len(argument)} long)"


def disassemble(data: Any) -> str:
    """A listing of the pickle in ``data``, one line per opcode, like ``pickletools.dis``.

    Each line has the byte offset, the opcode name, the argument's repr (a long
    payload is shortened and its length given), and for memo opcodes the memo
    index stored to (``-> memo[i]``) or read (``<- memo[i]``). Nothing in the
    pickle is run. Raises ``pickle.UnpicklingError`` as :func:`iter_instructions`.
    """
    if not isinstance(data, bytes):
        data = memoryview(data).tobytes()
    width = len(str(len(data)))
    memo: set[int] = set()
    lines = []
    for instruction in iter_instructions(data):
        opcode = instruction.opcode
        text = "" if opcode.arg.size == 0 else _shortened_repr(instruction.argument)
        if opcode is _MEMOIZE or opcode.name in _MEMO_PUTS:
            index = len(memo) if opcode is _MEMOIZE else instruction.argument
            memo.add(index)
            text = f"{text} -> memo[{index}]".lstrip()
        elif opcode.name in _MEMO_GETS:
            text = f"{text} <- memo[{instruction.argument}]"
        lines.append(f"{instruction.offset:>{width}}: {opcode.name:<16} {text}".rstrip())
    return "\n".join(lines) + "\n"


# -- globals_of: a symbolic run of the stack --------------------------------------------------

_MARK = object()   # a mark on the simulated stack
_VALUE = object()  # any value on the simulated stack other than a constant str


def _stack_effect(opcode: Opcode) -> tuple[int, bool, int]:
    """From the table's ``stack`` text: (items popped below any mark, pops to a mark?, pushes).

    "list, mark, any* -> list" is (1, True, 1): APPENDS pops everything down to the
    mark, the mark, then the list, and pushes one item.
    """
    before, after = (side.strip() for side in opcode.stack.split("->"))
    items = [item.strip() for item in before.split(",")] if before else []
    pushes = len(after.split(",")) if after else 0
    if "mark" in items:
        return items.index("mark"), True, pushes
    return len(items), False, pushes


#: By opcode name.
_STACK_EFFECTS: dict[str, tuple[int, bool, int]] = {
    opcode.name: _stack_effect(opcode) for opcode in opcodes.OPCODES}


class _Machine:
    """A run of a pickle's stack and memo that keeps constant strings and nothing else.

    ``step`` runs one instruction and returns the (module, name) it imports, if any.
    Each opcode has its handler, chosen once in ``_HANDLERS``.
    """

    def __init__(self) -> None:
        self.stack: list[Any] = []
        self.memo: dict[int, Any] = {}
        self.proto = 0

    def step(self, instruction: Instruction) -> tuple[str, str] | None:
        return _HANDLERS[instruction.opcode.name](self, instruction)

    def top(self, instruction: Instruction) -> Any:
        if not self.stack or self.stack[-1] is _MARK:
            raise UnpicklingError(f"{instruction.opcode.name} at offset {instruction.offset}: "
                                  f"needs an item and the stack has none above its mark")
        return self.stack[-1]

    def pop(self, instruction: Instruction) -> Any:
        self.top(instruction)
        return self.stack.pop()

    def generic(self, instruction: Instruction) -> None:
        """Pop and push as the table's stack effect says; what is pushed is no constant."""
        below, to_mark, pushes = _STACK_EFFECTS[instruction.opcode.name]
        stack = self.stack
        if to_mark:
            while stack and stack[-1] is not _MARK:
                stack.pop()
            if not stack:
                raise UnpicklingError(f"{instruction.opcode.name} at offset "
                                      f"{instruction.offset}: finds no MARK")
            stack.pop()
        for _ in range(below):
            self.pop(instruction)
        stack += [_VALUE] * pushes

    def push_text(self, instruction: Instruction) -> None:
        self.stack.append(instruction.argument)

    def push_eight_bit(self, instruction: Instruction) -> None:
        # What loads() with its default encoding='ASCII' makes of an 8-bit string.
        argument = instruction.argument
        self.stack.append(argument.decode("ascii") if argument.isascii() else _VALUE)

    def memoize(self, instruction: Instruction) -> None:
        self.memo[len(self.memo)] = self.top(instruction)

    def put(self, instruction: Instruction) -> None:
        self.memo[instruction.argument] = self.top(instruction)

    def get(self, instruction: Instruction) -> None:
        index = instruction.argument
        if index not in self.memo:
            raise UnpicklingError(f"{instruction.opcode.name} at offset {instruction.offset}: "
                                  f"reads memo[{index}], which was never stored")
        self.stack.append(self.memo[index])

    def mark(self, instruction: Instruction) -> None:
        self.stack.append(_MARK)

    def pop_one(self, instruction: Instruction) -> None:
        # POP with nothing above the top mark discards the mark.
        if self.stack and self.stack[-1] is _MARK:
            self.stack.pop()
        else:
            self.pop(instruction)

    def dup(self, instruction: Instruction) -> None:
        top = self.pop(instruction)
        self.stack += [top, top]

    def set_proto(self, instruction: Instruction) -> None:
        self.proto = instruction.argument

    def by_name(self, instruction: Instruction) -> tuple[str, str]:
        """GLOBAL and INST: their argument names the global."""
        self.generic(instruction)
        return instruction.argument

    def stack_global(self, instruction: Instruction) -> tuple[str, str]:
        name = self.pop(instruction)
        module = self.pop(instruction)
        if not (isinstance(module, str) and isinstance(name, str)):
            raise UnpicklingError(f"STACK_GLOBAL at offset {instruction.offset}: its module "
                                  f"and name are not constant strings")
        self.stack.append(_VALUE)
        return module, name

    def extension(self, instruction: Instruction) -> tuple[str, str]:
        self.generic(instruction)
        key = copyreg._inverted_registry.get(instruction.argument)  # type: ignore[attr-defined]
        if key is None:
            raise UnpicklingError(f"{instruction.opcode.name} at offset {instruction.offset}: "
                                  f"extension code {instruction.argument} is not registered "
                                  f"with copyreg")
        return key


def _handler(opcode: Opcode) -> Callable[[_Machine, Instruction], Any]:
    by_name = {
        "MARK": _Machine.mark, "POP": _Machine.pop_one, "DUP": _Machine.dup,
        "PROTO": _Machine.set_proto, "MEMOIZE": _Machine.memoize,
        "PUT": _Machine.put, "BINPUT": _Machine.put, "LONG_BINPUT": _Machine.put,
        "GET": _Machine.get, "BINGET": _Machine.get, "LONG_BINGET": _Machine.get,
        "GLOBAL": _Machine.by_name, "INST": _Machine.by_name,
        "STACK_GLOBAL": _Machine.stack_global,
        "EXT1": _Machine.extension, "EXT2": _Machine.extension, "EXT4": _Machine.extension,
    }
    if opcode.name in by_name:
        return by_name[opcode.name]
    if opcode.arg.name in _TEXT_KINDS:
        return _Machine.push_text
    if opcode.arg.name in _EIGHT_BIT_KINDS:
        return _Machine.push_eight_bit
    return _Machine.generic


#: By opcode name.
_HANDLERS: dict[str, Callable[[_Machine, Instruction], Any]] = {
    opcode.name: _handler(opcode) for opcode in opcodes.OPCODES}


def globals_of(data: Any) -> list[tuple[str, str]]:
    """The (module, name) pairs loading the pickle in ``data`` would import, nothing run.

    They come in the order of their first appearance, each once: the arguments of
    GLOBAL and INST, the constant strings STACK_GLOBAL takes from the stack
    (followed through the memo), and the globals EXT1/EXT2/EXT4 name in the
    running interpreter's ``copyreg`` extension registry. As ``loads`` does with
    its default ``fix_imports=True``, Python 2 names in a pickle of protocol < 3
    are given as the Python 3 names they are mapped to. 8-bit strings count as
    the str the default ``encoding='ASCII'`` makes of them.

    Raises ``pickle.UnpicklingError`` naming the offset if the pickle is malformed
    (see :func:`iter_instructions`, and stack underflow, a missing MARK, a memo
    read of an unset index), if STACK_GLOBAL's operands are not constant strings
    or if an EXT code is not registered.
    """
    machine = _Machine()
    found: dict[tuple[str, str], None] = {}
    for instruction in iter_instructions(data):
        named = machine.step(instruction)
        if named is not None:
            # As the unpickler's find_class does with fix_imports=True.
            found.setdefault(python3_name(*named) if machine.proto < 3 else named)
    return list(found)
