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

This module is the one place that picks the implementation: where they are built, the
C fast paths of the pickler (``_pickler_speedups``) and of the unpickler (``_speedups``)
are on, unless ``PSTORE_PURE_PYTHON`` is set to a non-empty value in the environment at
import; :func:`use_accelerators` switches both at run time. Results do not depend on it.
"""

from __future__ import annotations

import importlib
import os
from pickle import PickleBuffer, PickleError, PicklingError, UnpicklingError
from types import ModuleType
from typing import TYPE_CHECKING

from . import pickler as _pickler
from . import unpickler as _unpickler
from .opcodes import BATCH_SIZE, BY_CODE, DEFAULT_PROTOCOL, FRAME_SIZE_TARGET, HIGHEST_PROTOCOL
from .pickler import Pickler, dump, dumps
from .unpickler import Unpickler, load, loads

__all__ = [
    "Pickler", "Unpickler", "dump", "dumps", "load", "loads",
    "HIGHEST_PROTOCOL", "DEFAULT_PROTOCOL", "PickleBuffer",
    "PickleError", "PicklingError", "UnpicklingError",
    "disassemble", "globals_of", "iter_instructions", "Instruction", "use_accelerators",
    "RestrictedUnpickler", "RestrictedUnpicklingError", "restricted_loads",
]


# The tools and restricted loading are imported at first use (module __getattr__ below):
# loading a store needs neither, and ``import pstore`` stays short.
_LAZY = {
    "Instruction": "tools", "disassemble": "tools", "globals_of": "tools",
    "iter_instructions": "tools",
    "RestrictedUnpickler": "restricted", "RestrictedUnpicklingError": "restricted",
    "restricted_loads": "restricted",
}


if TYPE_CHECKING:   # what the lazy names are, for type checkers
    from .restricted import RestrictedUnpickler, RestrictedUnpicklingError, restricted_loads
    from .tools import Instruction, disassemble, globals_of, iter_instructions


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def _compiled(name: str) -> ModuleType | None:
    """The C extension ``pstore.engine.<name>``, or None where it was not built."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError:     # installed without a C compiler: pure Python does all the work
        return None


_pickler_speedups = _compiled("_pickler_speedups")
_unpickler_speedups = _compiled("_speedups")
_OPCODE_BYTES = {op.name: op.byte for op in BY_CODE.values()}
if _pickler_speedups is not None:
    _pickler_speedups.configure(_OPCODE_BYTES, BATCH_SIZE, FRAME_SIZE_TARGET)
if _unpickler_speedups is not None:
    _unpickler_speedups.set_opcodes(_OPCODE_BYTES, HIGHEST_PROTOCOL)


def use_accelerators(enabled: bool | None = None) -> bool:
    """Turn the C fast paths of both the pickler and the unpickler on or off.

    ``enabled=None`` (what importing pstore does) turns them on unless the environment
    variable ``PSTORE_PURE_PYTHON`` is set to a non-empty value. It takes effect at the
    next ``dump`` or ``load``, also of existing picklers and unpicklers. Returns True if
    both are now on; False if they are off, or not built (where pstore was installed
    without a C compiler, ``enabled`` changes nothing).
    """
    if enabled is None:
        enabled = not os.environ.get("PSTORE_PURE_PYTHON")
    _pickler._accelerator = _pickler_speedups if enabled else None
    speedups = _unpickler_speedups if enabled else None
    _unpickler._accelerate = speedups.run if speedups is not None else None
    _unpickler._load_pickle = speedups.load_pickle if speedups is not None else None
    return enabled and _pickler_speedups is not None and _unpickler_speedups is not None


use_accelerators()
