"""Orbax interop: bring Orbax runs into unickpt and hand unickpt checkpoints back to Orbax.

>>> import tempfile, numpy as np, orbax.checkpoint as ocp, unickpt
>>> d = tempfile.mkdtemp()
>>> with ocp.StandardCheckpointer() as ck:
...     ck.save(f"{d}/orbax/7", {"w": np.arange(3.0, dtype=np.float32), "n": 7})
>>> _ = import_orbax(f"{d}/orbax/7", f"{d}/uni/step_7")
>>> unickpt.load(f"{d}/uni/step_7")["w"].tolist()
[0.0, 1.0, 2.0]
>>> export_orbax(f"{d}/uni/step_7", f"{d}/back")
>>> with ocp.StandardCheckpointer() as ck:
...     ck.restore(f"{d}/back")["n"]
7
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

import unickpt
from unickpt.api import save_recorded
from unickpt.errors import CheckpointNotFoundError, UnsupportedLeafError
from unickpt.format.reader import CheckpointReader
from unickpt.tree import Path, ShardedArray, format_path

from .arrays import KEY_FIELDS
from .orbax_stream import item_metadata, read_item

__all__ = ["import_orbax", "export_orbax", "convert", "convert_total_bytes"]

Progress = Callable[[int], None]
#: Arrays over this size are exported in chunks of at most this size (see export_orbax).
CHUNK_BYTES = 64 << 20
_MARKERS = ("_METADATA", "manifest.ocdbt", "_sharding", "checkpoint")


def _is_item_dir(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in _MARKERS)


def _items(src: str) -> dict[str, str] | None:
    """Item name -> directory for a CheckpointManager step directory, or None for one item."""
    if os.path.exists(os.path.join(src, "_METADATA")) or os.path.exists(
            os.path.join(src, "manifest.ocdbt")):
        return None
    found = {n: os.path.join(src, n) for n in sorted(os.listdir(src))
             if not n.startswith((".", "_")) and _is_item_dir(os.path.join(src, n))}
    return found or None


def import_orbax(src_step_dir: str | os.PathLike, dst_checkpoint: str | os.PathLike, *,
                 progress: Progress | None = None, overwrite: bool = False) -> unickpt.SaveInfo:
    """Convert an Orbax checkpoint into a unickpt checkpoint at ``dst_checkpoint``.

    ``src_step_dir`` is a directory written by ``StandardCheckpointer``/``PyTreeCheckpointer``,
    or a ``CheckpointManager`` step directory: a single item becomes the whole tree, several
    items become ``{item_name: tree}``.  Arrays keep their stored dtype.  ``progress`` is
    called with each array's (or piece's) byte count as it is written.

    A checkpoint written by several processes (sharded ``jax.Array``s, one OCDBT tree per
    process) is read here, in one process, with bounded memory: big arrays are read piece by
    piece as they are written, and stay sharded along the shards Orbax saved (see
    :mod:`unickpt_jax.orbax_stream`); ``unickpt.load`` assembles them, a sharded restore reads
    only the pieces it needs.
    """
    src = os.path.abspath(os.fspath(src_step_dir))
    if not os.path.isdir(src):
        raise CheckpointNotFoundError(f"{src}: no Orbax checkpoint directory there")
    items = _items(src)
    if items is None:
        if not _is_item_dir(src):
            raise CheckpointNotFoundError(
                f"{src} is not an Orbax checkpoint (no _METADATA/manifest.ocdbt and no item "
                "directories); pass a StandardCheckpointer directory or a CheckpointManager "
                "step directory")
        tree = read_item(src, progress)
    elif len(items) == 1:
        tree = read_item(next(iter(items.values())), progress)
    else:
        tree = {name: read_item(p, progress) for name, p in items.items()}
    info: dict[str, Any] = {"converted_from": "orbax", "source": src}
    base = os.path.basename(src)
    if base.isdigit():
        info["step"] = int(base)
    return save_recorded(dst_checkpoint, tree, overwrite=overwrite, info=info)


def _to_orbax(x: Any, path: Path, bad: list[str], progress: Progress | None) -> Any:
    """The tree Orbax will store; sharded leaves stay sharded (assembled later, on disk)."""
    if isinstance(x, dict):
        if set(x) == set(KEY_FIELDS) and isinstance(x["impl"], str):
            # A typed PRNG key: Orbax stores keys as their raw data.
            return _to_orbax(x["key_data"], (*path, "key_data"), bad, progress)
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                k = str(k)  # Orbax keys are strings; ints become their decimal text
            out[k] = _to_orbax(v, (*path, k), bad, progress)
        return out
    if isinstance(x, (list, tuple)):
        return [_to_orbax(v, (*path, i), bad, progress) for i, v in enumerate(x)]
    if isinstance(x, (np.ndarray, np.generic, ShardedArray)):
        shape = tuple(x.shape)
        nbytes = math.prod(shape) * np.dtype(x.dtype).itemsize
        if 0 in shape:
            bad.append(f"{format_path(path)} (empty array)")
        if progress is not None:
            progress(nbytes)
        return x if isinstance(x, ShardedArray) else np.asarray(x)
    if isinstance(x, bool) or isinstance(x, float):
        return x
    if isinstance(x, int):
        if -(2**63) <= x < 2**63:
            return x
        bad.append(f"{format_path(path)} (int beyond 64 bits)")
        return None
    if x is None:
        return None
    bad.append(f"{format_path(path)} ({type(x).__name__})")
    return None


def _on_disk(x: Any, scratch: str, count: list[int]) -> Any:
    """Assemble each sharded leaf piece by piece into a memory-mapped scratch file.

    Orbax takes whole numpy arrays; a file-backed one keeps the export's own memory bounded
    (the kernel pages it in and out) instead of holding every sharded leaf assembled.
    """
    if isinstance(x, dict):
        return {k: _on_disk(v, scratch, count) for k, v in x.items()}
    if isinstance(x, list):
        return [_on_disk(v, scratch, count) for v in x]
    if not isinstance(x, ShardedArray):
        return x
    count[0] += 1
    mm = np.memmap(os.path.join(scratch, f"{count[0]}.bin"), dtype=x.dtype, mode="w+",
                   shape=tuple(x.shape))
    for p in x.pieces:
        mm[tuple(slice(a, b) for a, b in p.index)] = np.asarray(p.data)
    mm.flush()
    return np.asarray(mm)  # a plain ndarray view of the map (Orbax dispatches on the type)


def export_orbax(src_unickpt: str | os.PathLike, dst_dir: str | os.PathLike, *,
                 progress: Progress | None = None, overwrite: bool = False,
                 chunk_bytes: int | None = None) -> None:
    """Write the unickpt checkpoint ``src_unickpt`` as an Orbax ``StandardCheckpointer`` dir.

    Arrays become numpy arrays, Python scalars stay scalars, typed PRNG keys become their
    ``key_data``, int dict keys become strings.  Leaves Orbax cannot store (str, bytes, ints
    beyond 64 bits, empty arrays) are refused, all named in one
    :class:`~unickpt.UnsupportedLeafError`, before anything is written.

    Arrays are memory-mapped from the checkpoint (every checksum verified first) and sharded
    leaves assembled into a memory-mapped scratch file next to ``dst_dir``, so the export
    holds no copy of the state in memory.  Arrays over ``chunk_bytes`` (default
    :data:`CHUNK_BYTES`) are stored in chunks
    of at most that size, so that a sharded restore in a multi-process Orbax job reads about
    the regions its devices need, not whole arrays.
    """
    import jax
    import orbax.checkpoint as ocp

    dst = os.path.abspath(os.fspath(dst_dir))
    limit = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    with CheckpointReader(src_unickpt) as r:
        tree = r.tree(mmap=True, verify=True, assemble=False)
        bad: list[str] = []
        out = _to_orbax(tree, (), bad, progress)
        if bad:
            raise UnsupportedLeafError(
                f"cannot export {os.fspath(src_unickpt)} to Orbax: {len(bad)} leaves Orbax's "
                f"StandardCheckpointer cannot store: {', '.join(bad[:20])}"
                f"{' ...' if len(bad) > 20 else ''}; drop or convert them first")
        parent = os.path.dirname(dst)
        os.makedirs(parent, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".unickpt-export-", dir=parent) as scratch:
            out = _on_disk(out, scratch, [0])

            def save_args(a: Any) -> Any:
                big = isinstance(a, np.ndarray) and a.nbytes > limit
                return ocp.SaveArgs(chunk_byte_size=limit if big else None)

            with ocp.StandardCheckpointer() as ck:
                ck.save(dst, out, save_args=jax.tree_util.tree_map(save_args, out),
                        force=overwrite)
                ck.wait_until_finished()
            del out  # the maps, before the scratch directory goes


def _orbax_item_bytes(path: str) -> int:
    import jax
    from orbax.checkpoint import metadata as ocm

    return sum(math.prod(m.shape) * np.dtype(m.dtype).itemsize
               for m in jax.tree_util.tree_leaves(item_metadata(path))
               if isinstance(m, ocm.ArrayMetadata) and not isinstance(m, ocm.ScalarMetadata))


def convert_total_bytes(src: str | os.PathLike, *, to: Literal["unickpt", "orbax"]) -> int:
    """Array bytes :func:`convert` will report through ``progress`` (for a progress bar)."""
    if to == "orbax":
        return unickpt.inspect(src).total_bytes
    if to != "unickpt":
        raise unickpt.ConfigError(f"convert_total_bytes(to={to!r}): expected 'unickpt' or "
                                  "'orbax'")
    path = os.path.abspath(os.fspath(src))
    items = _items(path) if os.path.isdir(path) else None
    dirs = list(items.values()) if items else [path]
    return sum(_orbax_item_bytes(p) for p in dirs)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *,
            to: Literal["unickpt", "orbax"], progress: Progress | None = None,
            overwrite: bool = False) -> None:
    """Convert between Orbax and unickpt (what ``unickpt convert`` runs).

    ``to="unickpt"``: ``src`` is an Orbax checkpoint, ``dst`` the new unickpt checkpoint;
    ``to="orbax"``: the reverse.  ``progress`` receives byte counts as arrays are converted.
    """
    if to == "unickpt":
        import_orbax(src, dst, progress=progress, overwrite=overwrite)
    elif to == "orbax":
        export_orbax(src, dst, progress=progress, overwrite=overwrite)
    else:
        raise unickpt.ConfigError(f"convert(to={to!r}): expected 'unickpt' or 'orbax'")
