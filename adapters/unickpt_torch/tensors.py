"""torch.Tensor <-> numpy array, losslessly and without surprise copies.

bfloat16 and float8 tensors have no numpy twin inside torch (``tensor.numpy()`` refuses them),
and going through float32 would change NaN payloads and cost 2-4x the memory.  They are moved
as raw bits instead: a tensor is viewed as uint16/uint8 (same item size, zero copy), handed to
numpy, and the numpy array is viewed as the ``ml_dtypes`` type.  The way back is the mirror
image.

Device rules (what :func:`host_arrays` returns for each tensor):

* CPU tensor, normal save: a numpy view of the tensor's memory (zero copy; the writer reads
  it synchronously before training resumes).
* CPU tensor, snapshot (async save): a private copy.
* CUDA (or other device) tensor, normal save: a :class:`~unickpt.LazyArray` whose host copy
  is made only when the writer reaches it, so a save never holds a host copy of the whole model.
* CUDA tensor, snapshot: a copy into pinned (page-locked) host memory, issued
  ``non_blocking`` on the tensor's current stream for every tensor of the object, then one
  synchronisation.  Stream ordering guarantees the copy sees the values as of the save call.

>>> import torch
>>> a = to_numpy(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
>>> a.dtype.name, a.tolist()
('bfloat16', [1.5, -2.0])
>>> t = torch.zeros(2, dtype=torch.bfloat16)
>>> copy_into(t, a)
>>> t.tolist()
[1.5, -2.0]
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np
import torch

from unickpt.errors import UnsupportedLeafError
from unickpt.tree import LazyArray, Path, ShardedArray, format_path

from .dtensor import copy_into_dtensor, is_dtensor, to_sharded

__all__ = ["numpy_dtype", "to_numpy", "from_numpy", "new_tensor", "copy_into", "host_arrays",
           "host_array", "array_spec", "check_array"]

# torch dtypes numpy has no native type for: (ml_dtypes type, same-size integer carrier)
_BIT_VIEWS: dict[torch.dtype, tuple[Any, torch.dtype]] = {
    torch.bfloat16: (ml_dtypes.bfloat16, torch.uint16),
}
for _t, _m in (("float8_e4m3fn", "float8_e4m3fn"), ("float8_e5m2", "float8_e5m2"),
               ("float8_e4m3fnuz", "float8_e4m3fnuz"), ("float8_e5m2fnuz", "float8_e5m2fnuz"),
               ("float8_e8m0fnu", "float8_e8m0fnu")):
    if hasattr(torch, _t) and hasattr(ml_dtypes, _m):  # older releases lack some types
        _BIT_VIEWS[getattr(torch, _t)] = (getattr(ml_dtypes, _m), torch.uint8)

_NP_TO_BITVIEW = {np.dtype(m): (t, carrier) for t, (m, carrier) in _BIT_VIEWS.items()}
_CARRIER_NP = {torch.uint16: np.uint16, torch.uint8: np.uint8}

_NATIVE = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
           torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128]
for _n in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _n):
        _NATIVE.append(getattr(torch, _n))
_NATIVE_NP = {t: np.dtype(torch.empty(0, dtype=t).numpy().dtype) for t in _NATIVE}


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that stores ``dtype`` bit for bit.

    >>> numpy_dtype(torch.float8_e4m3fn).name
    'float8_e4m3fn'
    """
    if dtype in _NATIVE_NP:
        return _NATIVE_NP[dtype]
    if dtype in _BIT_VIEWS:
        return np.dtype(_BIT_VIEWS[dtype][0])
    raise UnsupportedLeafError(
        f"torch dtype {dtype} has no lossless numpy representation in unickpt; cast the "
        "tensor (e.g. complex32 -> complex64) before saving")


def _check_storable(t: torch.Tensor, path: Path) -> None:
    if t.layout != torch.strided:
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: {t.layout} tensors are not supported; convert "
            "with .to_dense() first")
    if t.is_quantized or t.is_meta or getattr(t, "is_nested", False):
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: quantized, meta and nested tensors are not "
            "supported; dequantize/materialise it first")
    try:
        numpy_dtype(t.dtype)
    except UnsupportedLeafError as e:
        raise UnsupportedLeafError(f"cannot save {format_path(path)}: {e}") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (no copy), bf16/float8 through a bit view."""
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if t.dtype in _BIT_VIEWS:
        np_type, carrier = _BIT_VIEWS[t.dtype]
        if t.dim() == 0:  # Tensor.view(dtype) needs at least one dimension
            return t.reshape(1).view(carrier).numpy().view(np_type).reshape(())
        return t.view(carrier).numpy().view(np_type)
    return t.numpy()


def from_numpy(a: Any) -> torch.Tensor:
    """A CPU tensor sharing ``a``'s memory (the caller copies it into its destination).

    Read-only arrays (memory maps of the checkpoint) are accepted: the tensor is only ever
    read from, so torch's warning about non-writable arrays is silenced here.
    """
    a = np.asarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("="))
    if any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)
    bit = _NP_TO_BITVIEW.get(a.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        if bit is not None:
            tdtype, carrier = bit
            raw = a.view(_CARRIER_NP[carrier])
            if raw.ndim == 0:
                return torch.from_numpy(raw.reshape(1)).view(tdtype).reshape(())
            return torch.from_numpy(raw).view(tdtype)
        return torch.from_numpy(a)


def new_tensor(a: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh tensor (owning its memory) holding the checkpoint array ``a`` on ``device``."""
    if isinstance(a, ShardedArray):
        a = a.assemble()
    src = from_numpy(a)
    out = torch.empty(src.shape, dtype=src.dtype, device=device)
    with torch.no_grad():
        out.copy_(src)
    return out


def array_spec(a: Any) -> tuple[tuple[int, ...], np.dtype] | None:
    """``(shape, dtype)`` of a checkpoint array leaf, or None if ``a`` is not an array."""
    if isinstance(a, ShardedArray):
        return tuple(a.shape), np.dtype(a.dtype)
    if isinstance(a, (np.ndarray, np.generic)):
        return tuple(a.shape), a.dtype
    return None


def check_array(target: torch.Tensor, a: Any) -> str | None:
    """Why ``a`` cannot be copied into ``target`` (None when it can)."""
    spec = array_spec(a)
    try:
        want = f"{numpy_dtype(target.dtype)}{list(target.shape)}"
    except UnsupportedLeafError as e:
        return str(e)
    if spec is None:
        kind = "None" if a is None else f"a {type(a).__name__}"
        return f"target is a tensor {want}, checkpoint has {kind}"
    shape, dtype = spec
    if shape != tuple(target.shape) or dtype != numpy_dtype(target.dtype):
        return f"target {want}, checkpoint {dtype}{list(shape)}"
    return None


def copy_into(target: torch.Tensor, a: Any) -> None:
    """Copy checkpoint array ``a`` into ``target`` in place, on ``target``'s device.

    Sharded arrays are copied piece by piece into the matching region, so no full-size host
    array is assembled.
    """
    if is_dtensor(target):  # FSDP2 / TP: only this rank's region is read
        copy_into_dtensor(target, a, from_numpy)
        return
    with torch.no_grad():
        if isinstance(a, ShardedArray):
            for p in a.pieces:
                region = tuple(slice(lo, hi) for lo, hi in p.index)
                data = p.data.materialize() if isinstance(p.data, LazyArray) else p.data
                target[region].copy_(from_numpy(data))
            return
        target.copy_(from_numpy(a))


class _Pending:
    """Pinned host copies issued asynchronously; :meth:`wait` makes them readable."""

    def __init__(self) -> None:
        self.streams: set[Any] = set()

    def wait(self) -> None:
        for s in self.streams:
            s.synchronize()
        self.streams.clear()


def _lazy_host(t: torch.Tensor) -> LazyArray:
    def fetch() -> np.ndarray:
        return to_numpy(t.detach().to("cpu"))

    return LazyArray(tuple(t.shape), numpy_dtype(t.dtype), fetch)


def _snapshot(t: torch.Tensor, pending: _Pending) -> np.ndarray:
    t = t.detach()
    if t.device.type == "cpu":
        return to_numpy(t.clone())
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        pending.streams.add(torch.cuda.current_stream(t.device))
        return to_numpy(host)
    return to_numpy(t.to("cpu"))


def host_arrays(tensors: Iterable[tuple[Path, torch.Tensor]], *, snapshot: bool) -> list[Any]:
    """Convert tensors to array leaves following the device rules in the module docstring."""
    pending = _Pending()
    out: list[Any] = []
    for path, t in tensors:
        if is_dtensor(t):  # FSDP2 / TP: this rank's shard with its global region
            out.append(to_sharded(t, path, lambda local, p=path: host_arrays(
                [(p, local)], snapshot=snapshot)[0]))
            continue
        _check_storable(t, path)
        if snapshot:
            out.append(_snapshot(t, pending))
        elif t.device.type == "cpu":
            out.append(to_numpy(t))
        else:
            out.append(_lazy_host(t))
    pending.wait()  # one synchronisation for all of an object's device->host copies
    return out


def host_array(t: torch.Tensor, path: Path, *, snapshot: bool) -> Any:
    """:func:`host_arrays` for one tensor."""
    return host_arrays([(path, t)], snapshot=snapshot)[0]
