"""DTensor (FSDP2, tensor parallel) <-> sharded arrays: each rank stores only its local shard.

A DTensor saves as a :class:`~unickpt.ShardedArray` of its global shape with one piece: this
rank's local shard and the global region it covers.  The multi-process save merges the
pieces of every rank into one sharded entry (a shard held by several ranks, as under
``Replicate``, is written once).  Restoring into a DTensor reads only the region of the
target's local shard, from whatever pieces the checkpoint has, so a checkpoint restores at any
world size and into plain tensors as well.

``torch.distributed.tensor`` is looked up in ``sys.modules`` only: a process that never
created a DTensor never imports it here.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np
import torch

from unickpt.errors import UnsupportedLeafError
from unickpt.tree import LazyArray, Path, Piece, ShardedArray, format_path

__all__ = ["is_dtensor", "local_region", "to_sharded", "read_region", "copy_into_dtensor",
           "new_like"]


def is_dtensor(t: Any) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_region(t: Any) -> tuple[tuple[int, int], ...]:
    """The global ``(start, stop)`` per dimension of this rank's local shard of ``t``."""
    return _region(tuple(t.shape), t.device_mesh, tuple(t.placements))


@functools.lru_cache(maxsize=4096)
def _region(shape: tuple[int, ...], mesh: Any, placements: tuple) -> tuple[tuple[int, int], ...]:
    # Cached: torch's computation costs ~1 ms per call, and a model's parameters and their
    # optimizer states share a handful of (shape, mesh, placements) keys.  This rank's place
    # in a mesh never changes, so the answer for a key never does.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape_, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple((int(o), int(o) + int(n)) for o, n in zip(offset, shape_))


def to_sharded(t: Any, path: Path, host: Any) -> ShardedArray:
    """``t`` as a sharded array holding this rank's piece; ``host(local)`` makes the array."""
    if any(p.is_partial() for p in t.placements):
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: a DTensor with a Partial placement holds "
            "pending reductions; call .redistribute() to Shard/Replicate it first")
    local = t.to_local()
    region = local_region(t)
    if tuple(local.shape) != tuple(b - a for a, b in region):
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: its local shard {list(local.shape)} does not "
            f"match the region {region} its placements give (uneven or strided sharding "
            "unsupported)")
    data = host(local)
    return ShardedArray(tuple(t.shape), np.dtype(data.dtype), [Piece(region, data)])


def read_region(a: Any, region: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The ``region`` of checkpoint array ``a`` (only the overlapping pieces are read)."""
    index = tuple(slice(lo, hi) for lo, hi in region)
    if isinstance(a, ShardedArray):
        for p in a.pieces:
            # Same world size and layout: the region is one saved piece.  Its memory-mapped
            # array is used as is (the caller copies it into the shard): no assembly copy.
            if tuple(map(tuple, p.index)) == tuple(region):
                data = p.data.materialize() if isinstance(p.data, LazyArray) else p.data
                if np.asarray(data).dtype == a.dtype:
                    return np.asarray(data)
        return a.read(index)
    return np.asarray(a)[index]


def copy_into_dtensor(target: Any, a: Any, from_numpy: Any) -> None:
    """Copy the target's own region of ``a`` into its local shard, in place."""
    region = local_region(target)
    src = read_region(a, region)
    with torch.no_grad():
        target.to_local().copy_(from_numpy(src))


def new_like(param: Any, a: Any, from_numpy: Any) -> Any:
    """A DTensor placed like ``param`` holding checkpoint array ``a`` (optimizer state)."""
    from torch.distributed.tensor import DTensor

    src = from_numpy(read_region(a, local_region(param)))
    local = torch.empty(src.shape, dtype=src.dtype, device=param.to_local().device)
    with torch.no_grad():
        local.copy_(src)
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())
