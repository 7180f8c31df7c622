"""Reading a checkpoint into one rank of a job (internal; docs/distributed.md).

No coordinator is needed to read: any process reads any checkpoint.  Plain arrays are
memory-mapped (checksummed when verify is on); the pieces of sharded arrays stay lazy, so a
rank reads (and checksums) only the pieces its own shards overlap.  Per-rank subtrees,
stored as one entry per saving rank, are narrowed to this rank's entry when the world size is
the one the checkpoint was written with; otherwise the restore is refused naming them, unless
``per_rank="keep"`` keeps the target's own per-rank state.
"""

from __future__ import annotations

import functools
from typing import Any, cast

from ..errors import ConfigError, IncompatibleCheckpointError
from ..format.dtypes import dtype_from_name
from ..format.reader import CheckpointReader
from ..tree import LazyArray, Path, Piece, ShardedArray, format_path
from .save import DIST_INFO

__all__ = ["PER_RANK_MODES", "read_tree", "narrow_per_rank"]

PER_RANK_MODES = ("error", "keep")


def read_tree(r: CheckpointReader, verify: bool) -> Any:
    """The checkpoint's tree: plain arrays memory-mapped, sharded pieces fetched on use."""
    m = r.manifest
    # Object stores have no zero-copy map (a whole-file buffer downloads every rank's file):
    # there, ranged reads fetch only the arrays and the pieces this rank uses.
    mmap = bool(getattr(r.storage, "maps_files", True))

    def array(i: int, _p: Path) -> Any:
        return r.read_array(i, mmap=mmap, verify=verify)

    def sharded(i: int, _p: Path) -> ShardedArray:
        s = m.sharded[i]
        dt = dtype_from_name(s.dtype)
        if s.byteorder == ">":
            dt = dt.newbyteorder(">")
        pieces = []
        for idx, a in s.pieces:
            e = m.arrays[a]
            pdt = dtype_from_name(e.dtype)
            pieces.append(Piece(idx, LazyArray(
                tuple(e.shape), pdt.newbyteorder(">") if e.byteorder == ">" else pdt,
                functools.partial(r.read_array, a, mmap=mmap, verify=verify))))
        return ShardedArray(tuple(s.shape), dt, pieces)

    return r.map_tree(array, sharded)


def _get(tree: Any, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: Any, path: Path, value: Any) -> Any:
    if not path:
        return value
    parent = _get(tree, path[:-1])
    if isinstance(parent, tuple):  # rebuild the tuple up the chain
        items = list(parent)
        items[cast(int, path[-1])] = value  # a tuple's path key is its index
        return _set(tree, path[:-1], tuple(items))
    parent[path[-1]] = value
    return tree


def narrow_per_rank(tree: Any, info: dict, state: Any, *, rank: int, world_size: int,
                    mode: str, checkpoint: object, select: list[Path] | None = None) -> Any:
    """Replace each per-rank subtree (one entry per saving rank) by this rank's entry."""
    if mode not in PER_RANK_MODES:
        raise ConfigError(f"per_rank={mode!r} is not allowed; use one of "
                          f"{', '.join(map(repr, PER_RANK_MODES))}")
    d = info.get(DIST_INFO)
    if not isinstance(d, dict):
        return tree
    saved = d.get("world_size")
    paths = [tuple(p) for p in d.get("per_rank") or []]
    if select is not None:
        paths = [p for p in paths if any(p[:len(s)] == s or s[:len(p)] == p for s in select)]
    if saved != world_size and paths and mode == "error":
        raise IncompatibleCheckpointError(
            f"the checkpoint was written by {saved} processes and is restored by {world_size}: "
            "its per-rank state (RNG, data position, Stateful objects) has no owner here. "
            "Pass per_rank='keep' to restore(...) to keep these objects as they are in the "
            "target (seed them per rank yourself), or restore at the saved world size",
            mismatched=[(format_path(p), f"per-rank state of {saved} ranks, restoring at "
                                         f"{world_size}") for p in paths],
            checkpoint=checkpoint)
    for p in paths:
        try:
            entries = _get(tree, p)
        except (KeyError, IndexError, TypeError):
            continue
        if saved == world_size and isinstance(entries, list) and len(entries) == saved:
            tree = _set(tree, p, entries[rank])
        else:  # "keep": the target's current state goes back into itself
            from ..state import to_tree

            try:
                current = _get(state, p)
            except (KeyError, IndexError, TypeError):
                continue
            tree = _set(tree, p, to_tree(current, snapshot=True)[0])
    return tree
