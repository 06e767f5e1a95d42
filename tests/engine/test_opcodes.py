"""The opcode table (pstore/engine/opcodes.py) against the standard library's description of
the format, and the rest of the engine against the table."""

from __future__ import annotations

import ast
import pickle
import pickletools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pstore import engine
from pstore.engine import opcodes, tools, unpickler

THEIRS = {info.name: info for info in pickletools.opcodes}

# pickletools' ArgumentDescriptor.n for arguments that are not a fixed number of bytes.
_PICKLETOOLS_SIZE = {opcodes.LINE: pickletools.UP_TO_NEWLINE,
                     opcodes.TWO_LINES: pickletools.UP_TO_NEWLINE,
                     opcodes.LEN_UINT1: pickletools.TAKEN_FROM_ARGUMENT1,
                     opcodes.LEN_INT4: pickletools.TAKEN_FROM_ARGUMENT4,
                     opcodes.LEN_UINT4: pickletools.TAKEN_FROM_ARGUMENT4U,
                     opcodes.LEN_UINT8: pickletools.TAKEN_FROM_ARGUMENT8U}


def test_the_table_has_every_opcode_of_pickletools_once():
    assert len(opcodes.OPCODES) == len(THEIRS) == 68
    assert set(opcodes.BY_NAME) == set(THEIRS)
    assert len(opcodes.BY_CODE) == 68


@pytest.mark.parametrize("opcode", opcodes.OPCODES, ids=lambda opcode: opcode.name)
def test_each_row_matches_pickletools(opcode):
    info = THEIRS[opcode.name]
    assert opcode.code == info.code.encode("latin-1")
    assert opcode.byte == opcode.code[0]
    assert opcode.proto == info.proto
    if info.arg is None:
        assert opcode.arg is opcodes.ARG_NONE
    else:
        assert opcode.arg.name == info.arg.name
        assert _PICKLETOOLS_SIZE.get(opcode.arg.size, opcode.arg.size) == info.arg.n


@pytest.mark.parametrize("opcode", opcodes.OPCODES, ids=lambda opcode: opcode.name)
def test_each_row_matches_pickles_constant(opcode):
    assert getattr(opcodes, opcode.name) == opcode.code
    assert getattr(pickle, opcode.name) == opcode.code


def test_pickle_has_no_opcode_constant_the_table_lacks():
    # pickle also names two whole INT instructions, TRUE (b"I01\n") and FALSE (b"I00\n").
    constants = {name for name in dir(pickle)
                 if name.isupper() and isinstance(getattr(pickle, name), bytes)}
    assert constants - set(opcodes.BY_NAME) == {"TRUE", "FALSE"}


def test_protocol_constants():
    assert opcodes.HIGHEST_PROTOCOL == pickle.HIGHEST_PROTOCOL == 5
    assert opcodes.DEFAULT_PROTOCOL == pickle.DEFAULT_PROTOCOL
    assert engine.HIGHEST_PROTOCOL == opcodes.HIGHEST_PROTOCOL
    assert engine.DEFAULT_PROTOCOL == opcodes.DEFAULT_PROTOCOL


def test_protocol_constants_are_defined_only_in_the_table_module():
    engine_dir = Path(opcodes.__file__).parent
    for path in engine_dir.glob("*.py"):
        assigned = {target.id for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for target in (node.targets if isinstance(node, ast.Assign)
                                   else [node.target])
                    if isinstance(target, ast.Name)}
        constants = assigned & {"HIGHEST_PROTOCOL", "DEFAULT_PROTOCOL"}
        assert constants == (set() if path.name != "opcodes.py" else
                             {"HIGHEST_PROTOCOL", "DEFAULT_PROTOCOL"}), path.name


@pytest.mark.parametrize("opcode", opcodes.OPCODES, ids=lambda opcode: opcode.name)
def test_each_opcode_has_one_handler_in_the_unpickler(opcode):
    handler = getattr(unpickler, f"load_{opcode.name.lower()}", None)
    assert (handler is not None) != (opcode.name in unpickler._INLINE)
    in_mark_table = unpickler._MARK_HANDLERS[opcode.byte]
    in_table = unpickler._HANDLERS[opcode.byte]
    if handler is None:
        assert in_table is None and in_mark_table is None
    elif opcode.name in unpickler._MARK_CONSUMERS:
        assert in_mark_table is handler and in_table is None
    else:
        assert in_table is handler and in_mark_table is None


def test_the_unpickler_has_no_handler_for_an_unknown_byte():
    unknown = set(range(256)) - set(opcodes.BY_CODE)
    assert all(unpickler._HANDLERS[byte] is None and unpickler._MARK_HANDLERS[byte] is None
               for byte in unknown)
    handled = {name[len("load_"):].upper() for name in dir(unpickler) if name.startswith("load_")}
    assert handled <= set(opcodes.BY_NAME)


@pytest.mark.parametrize("opcode", opcodes.OPCODES, ids=lambda opcode: opcode.name)
def test_each_opcode_has_a_reader_and_a_handler_in_the_tools(opcode):
    row, read = tools._READERS[opcode.byte]
    assert row is opcode and callable(read)
    assert opcode.name in tools._HANDLERS
    assert opcode.name in tools._STACK_EFFECTS


@given(st.binary(max_size=64))
def test_utf8_arguments_decode_as_cpython_reads_them(raw):
    # BINUNICODE's text, decoded by the engine and by CPython's unpickler.
    data = b"X" + len(raw).to_bytes(4, "little") + raw + b"."
    try:
        expected = pickle.loads(data)
    except UnicodeDecodeError:
        with pytest.raises(UnicodeDecodeError):
            opcodes.decode_utf8(raw)
        return
    assert opcodes.decode_utf8(raw) == expected


def test_python2_names_both_ways():
    assert opcodes.python3_name("__builtin__", "xrange") == ("builtins", "range")
    assert opcodes.python2_name("builtins", "range") == ("__builtin__", "xrange")
    assert opcodes.python3_name("Queue", "Queue") == ("queue", "Queue")
    assert opcodes.python2_name("queue", "Queue") == ("Queue", "Queue")
    assert opcodes.python3_name("mymodule", "Thing") == ("mymodule", "Thing")
    assert opcodes.python2_name("mymodule", "Thing") == ("mymodule", "Thing")
