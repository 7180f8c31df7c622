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

import os
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

import unickpt
from unickpt.api import save_recorded
from unickpt.errors import CheckpointNotFoundError, UnsupportedLeafError
from unickpt.tree import Path, ShardedArray, format_path

from .arrays import KEY_FIELDS

__all__ = ["import_orbax", "export_orbax", "convert", "convert_total_bytes"]

Progress = Callable[[int], None]
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


def _read_item(path: str, progress: Progress | None) -> Any:
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import metadata as ocm

    with ocp.PyTreeCheckpointer() as ck:
        meta = ck.metadata(path)
        tree_meta = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree

        def restore_args(m: Any) -> Any:
            # numpy, never jax: no device memory, and no int64 -> int32 truncation when
            # jax_enable_x64 is off.
            if isinstance(m, ocm.ArrayMetadata):
                return ocp.RestoreArgs(restore_type=np.ndarray)
            return ocp.RestoreArgs()

        args = jax.tree_util.tree_map(restore_args, tree_meta)
        tree = ck.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return _to_neutral(tree, tree_meta, (), progress, ocm.ScalarMetadata)


def _to_neutral(x: Any, meta: Any, path: Path, progress: Progress | None,
                scalar_meta: type) -> Any:
    if isinstance(x, dict):
        return {k: _to_neutral(v, _sub(meta, k), (*path, k), progress, scalar_meta)
                for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_neutral(v, _sub(meta, i), (*path, i), progress, scalar_meta)
                for i, v in enumerate(x)]
    if isinstance(meta, scalar_meta) and isinstance(x, (np.ndarray, np.generic)) and \
            np.ndim(x) == 0:
        return np.asarray(x).item()  # saved as a Python scalar: give one back (exact bits)
    if isinstance(x, (np.ndarray, np.generic)):
        a = np.asarray(x)
        if progress is not None:
            progress(int(a.nbytes))
        return a
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if hasattr(x, "__array__"):  # a jax.Array restored by an older Orbax: host copy
        a = np.asarray(x)
        if progress is not None:
            progress(int(a.nbytes))
        return a
    raise UnsupportedLeafError(f"cannot import {format_path(path)}: Orbax returned a "
                               f"{type(x).__name__}")


def _sub(meta: Any, k: Any) -> Any:
    try:
        return meta[k]
    except (KeyError, IndexError, TypeError):
        return None


def import_orbax(src_step_dir: str | os.PathLike, dst_checkpoint: str | os.PathLike, *,
                 progress: Progress | None = None, overwrite: bool = False) -> unickpt.SaveInfo:
    """Convert an Orbax checkpoint into a unickpt checkpoint at ``dst_checkpoint``.

    ``src_step_dir`` is a directory written by ``StandardCheckpointer``/``PyTreeCheckpointer``,
    or a ``CheckpointManager`` step directory: a single item becomes the whole tree, several
    items become ``{item_name: tree}``.  Arrays are read as numpy arrays with their stored
    dtype.  ``progress`` is called with each array's byte count.
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
        tree = _read_item(src, progress)
    elif len(items) == 1:
        tree = _read_item(next(iter(items.values())), progress)
    else:
        tree = {name: _read_item(p, progress) for name, p in items.items()}
    info: dict[str, Any] = {"converted_from": "orbax", "source": src}
    base = os.path.basename(src)
    if base.isdigit():
        info["step"] = int(base)
    return save_recorded(dst_checkpoint, tree, overwrite=overwrite, info=info)


def _to_orbax(x: Any, path: Path, bad: list[str], progress: Progress | None) -> Any:
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
    if isinstance(x, ShardedArray):
        x = x.assemble()
    if isinstance(x, (np.ndarray, np.generic)):
        a = np.asarray(x)
        if a.size == 0:
            bad.append(f"{format_path(path)} (empty array)")
        if progress is not None:
            progress(int(a.nbytes))
        return a
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


def export_orbax(src_unickpt: str | os.PathLike, dst_dir: str | os.PathLike, *,
                 progress: Progress | None = None, overwrite: bool = False) -> None:
    """Write the unickpt checkpoint ``src_unickpt`` as an Orbax ``StandardCheckpointer`` dir.

    Arrays become numpy arrays (sharded leaves are assembled), Python scalars stay scalars,
    typed PRNG keys become their ``key_data``, int dict keys become strings.  Leaves Orbax
    cannot store (str, bytes, ints beyond 64 bits, empty arrays) are refused, all named in one
    :class:`~unickpt.UnsupportedLeafError`, before anything is written.
    """
    import orbax.checkpoint as ocp

    tree = unickpt.load(src_unickpt)
    bad: list[str] = []
    out = _to_orbax(tree, (), bad, progress)
    if bad:
        raise UnsupportedLeafError(
            f"cannot export {os.fspath(src_unickpt)} to Orbax: {len(bad)} leaves Orbax's "
            f"StandardCheckpointer cannot store: {', '.join(bad[:20])}"
            f"{' ...' if len(bad) > 20 else ''}; drop or convert them first")
    dst = os.path.abspath(os.fspath(dst_dir))
    with ocp.StandardCheckpointer() as ck:
        ck.save(dst, out, force=overwrite)
        ck.wait_until_finished()


def _orbax_item_bytes(path: str) -> int:
    import jax
    import orbax.checkpoint as ocp
    from orbax.checkpoint import metadata as ocm

    with ocp.PyTreeCheckpointer() as ck:
        meta = ck.metadata(path)
    tree_meta = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    return sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize
               for m in jax.tree_util.tree_leaves(tree_meta)
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
