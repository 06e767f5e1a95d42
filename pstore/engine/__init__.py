"""pstore's own implementation of the pickle protocol, versions 0 to 5.

The public API is the standard library's: :class:`Pickler`, :class:`Unpickler`,
:func:`dump`, :func:`dumps`, :func:`load`, :func:`loads`, the protocol
constants and the exception classes (which *are* ``pickle``'s, so
``except pickle.UnpicklingError`` catches ours). For protocols 0 to 5,
``dumps(obj, protocol)`` writes the same bytes as the running CPython's
``pickle.dumps``.

Two tools read pickles without running them: :func:`disassemble` and
:func:`globals_of`. :class:`RestrictedUnpickler` and :func:`restricted_loads` load
pickles one does not trust as data only (docs/safety.md).

This module is the one place that picks the implementation, so that a compiled
accelerator can be put behind it later without touching any caller.
"""

from __future__ import annotations

from pickle import PickleBuffer, PickleError, PicklingError, UnpicklingError

from .opcodes import DEFAULT_PROTOCOL, HIGHEST_PROTOCOL
from .pickler import Pickler, dump, dumps
from .unpickler import Unpickler, load, loads
from .tools import Instruction, disassemble, globals_of, iter_instructions
from .restricted import RestrictedUnpickler, RestrictedUnpicklingError, restricted_loads

__all__ = [
    "Pickler", "Unpickler", "dump", "dumps", "load", "loads",
    "HIGHEST_PROTOCOL", "DEFAULT_PROTOCOL", "PickleBuffer",
    "PickleError", "PicklingError", "UnpicklingError",
    "disassemble", "globals_of", "iter_instructions", "Instruction",
    "RestrictedUnpickler", "RestrictedUnpicklingError", "restricted_loads",
]
