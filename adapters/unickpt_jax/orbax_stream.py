"""Stream an Orbax checkpoint item into a state tree whose arrays are read only when written.

An Orbax checkpoint written by several processes (each process's shards in its own
``ocdbt.process_<i>`` tree, merged by the top-level OCDBT manifest) is read by one process
with bounded memory: small arrays and scalars come back from one Orbax restore (as numpy:
no device memory); every other array becomes a :class:`~unickpt.tree.ShardedArray` whose
pieces follow the chunks Orbax wrote (a saved shard is a whole number of them), each a
:class:`~unickpt.tree.LazyArray` that reads its region through TensorStore when the writer
asks for its bytes.  A conversion therefore holds about one piece per writer thread, not the
checkpoint, and the converted checkpoint keeps the saved layout, so a sharded restore reads
only the pieces its devices need.

>>> import tempfile, numpy as np, orbax.checkpoint as ocp
>>> d = tempfile.mkdtemp() + "/ck"
>>> with ocp.StandardCheckpointer() as ck:
...     ck.save(d, {"w": np.arange(6.0).reshape(2, 3), "n": 3})
>>> tree = read_item(d, eager_bytes=0)
>>> tree["n"], type(tree["w"]).__name__, tree["w"].assemble().tolist()
(3, 'ShardedArray', [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from unickpt.errors import CorruptCheckpointError, UnsupportedLeafError
from unickpt.tree import LazyArray, Path, Piece, ShardedArray, format_path

__all__ = ["read_item", "item_metadata", "EAGER_BYTES", "PIECE_BYTES"]

Progress = Callable[[int], None]

#: Arrays up to this size, together up to EAGER_BYTES, come back from one Orbax restore call
#: (one TensorStore open per array would cost more than reading them).
SMALL_BYTES = 1 << 20
EAGER_BYTES = 64 << 20
#: Pieces smaller than this are merged along the saved grid (fewer, larger reads and entries);
#: a conversion holds about two pieces per writer thread.
PIECE_BYTES = 4 << 20
#: TensorStore's cache of OCDBT B-tree nodes (Orbax's default is 100 MB: sized for restoring
#: onto accelerators, not for one process streaming a checkpoint once).
BTREE_CACHE_BYTES = 16 << 20


def item_metadata(path: str) -> Any:
    """The Orbax tree metadata of one item directory (``path`` absolute: Orbax needs it)."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ck:
        meta = ck.metadata(path)
    item = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    if item is None:
        raise CorruptCheckpointError(
            f"{path}: Orbax cannot read this checkpoint's tree metadata (_METADATA missing or "
            "damaged); convert a complete Orbax checkpoint", path=path)
    return item.tree


def _is_array(m: Any, ocm: Any) -> bool:
    return isinstance(m, ocm.ArrayMetadata) and not isinstance(m, ocm.ScalarMetadata)


def _nbytes(m: Any) -> int:
    return math.prod(m.shape) * np.dtype(m.dtype).itemsize


def read_item(path: str, progress: Progress | None = None, *,
              eager_bytes: int | None = None, piece_bytes: int | None = None) -> Any:
    """The neutral tree of the Orbax item at ``path``, big arrays as lazy sharded leaves.

    ``eager_bytes`` (default :data:`EAGER_BYTES`) caps the small arrays restored at once;
    ``piece_bytes`` (default :data:`PIECE_BYTES`) is the size pieces are merged up to.
    """
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import metadata as ocm

    path = os.path.abspath(path)
    meta = item_metadata(path)
    leaves = jax.tree_util.tree_leaves(meta)
    budget = EAGER_BYTES if eager_bytes is None else eager_bytes
    piece_bytes = PIECE_BYTES if piece_bytes is None else piece_bytes
    lazy: set[int] = set()
    for m in leaves:  # small arrays first come, first served until the eager budget is spent
        if _is_array(m, ocm):
            nb = _nbytes(m)
            if nb > SMALL_BYTES or nb > budget:
                lazy.add(id(m))
            else:
                budget -= nb
    eager = None
    if len(lazy) < len(leaves):
        def item(m: Any) -> Any:
            return ocp.PLACEHOLDER if id(m) in lazy else 0

        def restore_args(m: Any) -> Any:
            # numpy, never jax: no device memory, and no int64 -> int32 truncation when
            # jax_enable_x64 is off.
            if isinstance(m, ocm.ArrayMetadata) and id(m) not in lazy:
                return ocp.RestoreArgs(restore_type=np.ndarray)
            return ocp.RestoreArgs()

        with ocp.PyTreeCheckpointer() as ck:
            eager = ck.restore(path, args=ocp.args.PyTreeRestore(
                item=jax.tree_util.tree_map(item, meta),
                restore_args=jax.tree_util.tree_map(restore_args, meta)))
    return _to_neutral(eager, meta, (), progress, ocm, lazy, _Opener(path), piece_bytes)


class _Opener:
    """Opens the TensorStore of one array of an item (shared context: one B-tree cache)."""

    def __init__(self, path: str):
        import orbax.checkpoint as ocp
        from etils import epath

        self.dir = epath.Path(path)
        self.ocdbt = bool(ocp.type_handlers.is_ocdbt_checkpoint(self.dir))
        try:
            with open(os.path.join(path, "_METADATA"), encoding="utf-8") as f:
                self.zarr3 = bool(json.load(f).get("use_zarr3", False))
        except (OSError, ValueError, AttributeError):
            self.zarr3 = False
        import tensorstore as ts

        self.context = ts.Context({"file_io_concurrency": {"limit": 16},
                                   "cache_pool#ocdbt": {"total_bytes_limit": BTREE_CACHE_BYTES}})

    def open(self, name: str) -> Any:
        import orbax.checkpoint as ocp
        import tensorstore as ts

        info = ocp.type_handlers.ParamInfo(name=name, parent_dir=self.dir, use_zarr3=self.zarr3,
                                           ts_context=self.context)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self.ocdbt)
        return ts.open(spec, context=self.context, open=True, read=True).result()


class _LazyStore:
    """One array's TensorStore, opened on the first piece read and closed after the last."""

    def __init__(self, opener: _Opener, name: str, npieces: int):
        self.opener, self.name, self.left = opener, name, npieces
        self.lock = threading.Lock()
        self.store: Any = None

    def read(self, index: tuple[tuple[int, int], ...], dtype: np.dtype,
             progress: Progress | None) -> np.ndarray:
        with self.lock:
            if self.store is None:
                self.store = self.opener.open(self.name)
            store = self.store
        region = store[tuple(slice(a, b) for a, b in index)] if index else store
        a = np.asarray(region.read().result())
        if a.dtype != dtype:  # same bits, the numpy spelling of the dtype (e.g. bfloat16)
            a = a.view(dtype)
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.store = None  # the last piece: release the store and its caches
        if progress is not None:
            progress(int(a.nbytes))
        return a


def _piece_shape(shape: tuple[int, ...], chunk: tuple[int, ...], itemsize: int,
                 piece_bytes: int) -> tuple[int, ...]:
    """The stored chunk shape, grown along the chunk grid (last axes first) to ~piece_bytes."""
    p = [max(1, min(c, s)) for c, s in zip(chunk, shape)]
    for d in reversed(range(len(p))):
        while p[d] < shape[d] and math.prod(p) * itemsize * 2 <= piece_bytes:
            p[d] = min(p[d] * 2, shape[d])
        if p[d] < shape[d]:
            break  # growing an earlier axis now would make pieces that are not contiguous
    return tuple(p)


def _lazy_array(m: Any, path: Path, progress: Progress | None, opener: _Opener,
                piece_bytes: int) -> ShardedArray:
    shape = tuple(int(s) for s in m.shape)
    dtype = np.dtype(m.dtype)
    storage = getattr(m, "storage", None)
    # the stored chunk (the unit TensorStore reads; a saved shard is a whole number of them)
    chunk = getattr(storage, "chunk_shape", None) or getattr(storage, "write_shape", None)
    piece = _piece_shape(shape, tuple(chunk) if chunk and len(chunk) == len(shape) else shape,
                         dtype.itemsize, piece_bytes)
    grid = [range(0, s, p) for s, p in zip(shape, piece)]
    starts = np.stack(np.meshgrid(*grid, indexing="ij"), -1).reshape(-1, len(shape)) \
        if shape else np.zeros((1, 0), int)
    store = _LazyStore(opener, m.name, len(starts))
    pieces = []
    for st in starts:
        index = tuple((int(a), min(int(a) + p, s)) for a, p, s in zip(st, piece, shape))
        pshape = tuple(b - a for a, b in index)

        def fetch(index: tuple = index) -> np.ndarray:
            return store.read(index, dtype, progress)

        pieces.append(Piece(index, LazyArray(pshape, dtype, fetch)))
    return ShardedArray(shape, dtype, pieces)


def _to_neutral(x: Any, meta: Any, path: Path, progress: Progress | None, ocm: Any,
                lazy: set[int], opener: _Opener, piece_bytes: int) -> Any:
    if isinstance(meta, dict):
        return {k: _to_neutral(_sub(x, k), v, (*path, k), progress, ocm, lazy, opener,
                               piece_bytes) for k, v in meta.items()}
    if isinstance(meta, (list, tuple)):
        return [_to_neutral(_sub(x, i), v, (*path, i), progress, ocm, lazy, opener,
                            piece_bytes) for i, v in enumerate(meta)]
    if id(meta) in lazy:
        return _lazy_array(meta, path, progress, opener, piece_bytes)
    if isinstance(meta, ocm.ScalarMetadata) and isinstance(x, (np.ndarray, np.generic)) and \
            np.ndim(x) == 0:
        return np.asarray(x).item()  # saved as a Python scalar: give one back (exact bits)
    if isinstance(x, (np.ndarray, np.generic)) or (
            hasattr(x, "__array__") and not isinstance(x, (bool, int, float, str))):
        a = np.asarray(x)  # (a jax.Array restored by an older Orbax: a host copy)
        if progress is not None:
            progress(int(a.nbytes))
        return a
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise UnsupportedLeafError(f"cannot import {format_path(path)}: Orbax returned a "
                               f"{type(x).__name__}")


def _sub(x: Any, k: Any) -> Any:
    try:
        return x[k]
    except (KeyError, IndexError, TypeError):
        return None
