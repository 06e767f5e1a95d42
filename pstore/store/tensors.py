"""torch tensors out of band: one blob per storage, loaded mapped like numpy arrays.

torch pickles a tensor's storage into the pickle stream itself, never offering a
``PickleBuffer``, so a 50 MB tensor would be copied into its record and read back
whole. :class:`TensorReducer` is the record pickler's ``reducer_override`` for
tensors instead: a tensor becomes its dtype, shape, stride, storage offset and
``requires_grad``, plus a reference to its *storage*, which pickles as one
out-of-band buffer of its bytes -- a blob, loaded mapped. Tensors that share a
storage (views) share one storage object in the pickle, so they load as views
of one storage again.

pstore does not import torch: the store asks for a reducer only while ``torch``
is in ``sys.modules`` (:func:`torch_if_imported`), and loading imports it only to
rebuild a tensor a record holds. Tensors on another device are saved from a CPU
copy and load on the CPU; sparse, quantized and other non-strided tensors, and
tensor subclasses other than ``nn.Parameter``, are left to torch's own pickling.
See docs/datasets.md.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from ..engine import PickleBuffer

__all__ = ["TensorReducer", "torch_if_imported", "rebuild_storage", "rebuild_tensor"]


def torch_if_imported() -> Any:
    """The torch module if something imported it already, else None (never imports it)."""
    return sys.modules.get("torch")


class _Storage:
    """One tensor storage while a record is pickled: it pickles as its bytes, out of band."""

    __slots__ = ("bytes_view",)

    def __init__(self, bytes_view: memoryview) -> None:
        self.bytes_view = bytes_view

    def __reduce__(self) -> tuple[Any, ...]:
        return rebuild_storage, (PickleBuffer(self.bytes_view),)


class TensorReducer:
    """``reducer_override`` for torch tensors, for one pickler; :meth:`clear` after each dump.

    Within one dump, every tensor on one storage refers to the same :class:`_Storage`,
    so the pickle's memo writes the storage once and the other tensors refer to it.
    """

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self._kinds = (torch.Tensor, torch.nn.Parameter)
        self._storages: dict[tuple[int, int], _Storage] = {}
        self._kept: list[Any] = []      # CPU copies and storages, alive until the dump ends

    def reduce(self, obj: Any) -> Any:
        """The reduction of a plain strided tensor (or Parameter), else NotImplemented."""
        kind = type(obj)
        if kind not in self._kinds:
            return NotImplemented
        torch = self._torch
        if obj.layout is not torch.strided or obj.is_quantized or obj.is_nested:
            return NotImplemented
        tensor = obj.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        storage = tensor.untyped_storage()
        self._kept += (tensor, storage)
        identity = (storage.data_ptr(), storage.nbytes())
        held = self._storages.get(identity)
        if held is None:
            raw = torch.empty(0, dtype=torch.uint8).set_(storage)
            held = self._storages[identity] = _Storage(memoryview(raw.numpy()).cast("B"))
            self._kept.append(raw)
        return rebuild_tensor, (held, str(tensor.dtype).removeprefix("torch."),
                                tuple(tensor.shape), tuple(tensor.stride()),
                                tensor.storage_offset(), bool(obj.requires_grad),
                                kind is torch.nn.Parameter)

    def clear(self) -> None:
        self._storages.clear()
        self._kept.clear()


def rebuild_storage(buffer: Any) -> Any:
    """A 1-D ``uint8`` tensor on the bytes of ``buffer`` (a mapped blob: not copied).

    A read-only buffer (``readonly_buffers=True``) gives a tensor on read-only
    memory: torch has no read-only tensors, so writing to it ends the process.
    """
    import torch

    view = memoryview(buffer)
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():     # torch warns of read-only buffers: documented above
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)


def rebuild_tensor(storage: Any, dtype: str, shape: tuple[int, ...], stride: tuple[int, ...],
                   offset: int, requires_grad: bool, parameter: bool) -> Any:
    """The tensor of ``dtype`` at ``offset`` elements into ``storage`` with ``shape`` and
    ``stride``; every length is checked against the storage before it is used."""
    import torch

    element = getattr(torch, dtype, None)
    if not isinstance(element, torch.dtype):
        raise ValueError(f"a stored tensor names the dtype {dtype!r}, which torch lacks")
    if (len(shape) != len(stride) or offset < 0
            or not all(isinstance(n, int) and n >= 0 for n in (*shape, *stride, offset))):
        raise ValueError(f"a stored tensor has a malformed layout: shape {shape}, stride "
                         f"{stride}, offset {offset}")
    itemsize = torch.empty(0, dtype=element).element_size()
    if 0 not in shape:
        last = offset + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))
        if (last + 1) * itemsize > storage.numel():
            raise ValueError(f"a stored tensor of shape {shape} and stride {stride} at "
                             f"offset {offset} reaches past its storage of "
                             f"{storage.numel()} bytes")
    tensor = torch.empty(0, dtype=element).set_(storage.untyped_storage(), offset, shape, stride)
    if parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor
