"""One checkpoint written by every rank and committed once (internal; docs/distributed.md).

The steps, each a collective of the :class:`~unickpt.dist.Coordinator`:

1. *plan* (all_gather): rank 0 creates the staging directory and sends its name; every rank
   sends its sharded pieces, the bytes of its per-rank state and a digest of the replicated
   structure.  Every rank then computes the same assignment: each piece and each replicated
   array is written by exactly one rank, greedily balancing bytes.
2. every rank writes its own file ``arrays-r{rank}.safetensors`` into the staging directory
   and syncs it (durable);
3. *report* (all_gather): each rank sends its file entry, array entries (offsets, checksums)
   and the encoding of its per-rank subtrees, or the error it hit;
4. *commit* (broadcast): rank 0 merges the reports into one manifest, writes it, syncs it and
   publishes the directory in one atomic step, then tells every rank the outcome.

A rank that fails reports it; a rank that dies makes the next collective time out.  Either
way nothing is committed, every rank raises, and rank 0 removes the staging directory.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import posixpath
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import msgpack
import numpy as np

from ..errors import UnsupportedLeafError
from ..format import checksum
from ..format.dtypes import dtype_name
from ..format.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ArrayEntry,
    FileEntry,
    Manifest,
    ShardedEntry,
    read_manifest_bytes,
)
from ..format.writer import WriteStats, layout, plain_data, write_jobs
from ..storage import Storage
from ..tree import Path, format_path
from .coordinator import CoordinationError, Coordinator
from .plan import assign, per_rank_paths, rank_file

__all__ = ["commit_distributed", "fail_plan", "DIST_INFO", "collective_save",
           "in_collective_save"]

#: The manifest ``info`` key describing a multi-process checkpoint.
DIST_INFO = "distributed"

_COLLECTIVE = contextvars.ContextVar("unickpt_collective_save", default=False)


@contextlib.contextmanager
def collective_save(on: bool = True) -> Iterator[None]:
    """Mark the state conversion inside as part of a multi-process save.

    Adapters may then return a :class:`~unickpt.tree.ShardedArray` holding only this
    process's pieces of an array that spans processes (a JAX array that is not fully
    addressable): the protocol below gathers every process's pieces into one checkpoint.
    Outside it such an array must be refused, since a one-process save would commit a
    checkpoint with holes.

    >>> with collective_save():
    ...     in_collective_save()
    True
    >>> in_collective_save()
    False
    """
    token = _COLLECTIVE.set(bool(on))
    try:
        yield
    finally:
        _COLLECTIVE.reset(token)


def in_collective_save() -> bool:
    """Whether the current state conversion is part of a multi-process save."""
    return _COLLECTIVE.get()


def _under(path: Path, prefixes: list[Path]) -> Path | None:
    for p in prefixes:
        if path[:len(p)] == p:
            return p
    return None


def _piece_key(skey: str, index: Any) -> str:
    return skey + "\x00" + ",".join(f"{a}:{b}" for a, b in index)


class _Local:
    """What this rank holds, classified: per-rank jobs, sharded pieces, replicated arrays."""

    def __init__(self, flat: tuple, per_rank: list[Path]):
        _node, jobs, sharded = self.node, self.jobs, self.sharded = flat
        self.own: list[int] = []
        self.pieces: dict[str, int] = {}  # piece key -> job index
        self.piece_info: dict[int, tuple[str, list]] = {}  # job index -> (sharded key, index)
        self.rep: dict[str, int] = {}  # replicated array key -> job index
        piece_of = {ji: (si, pi) for si, (_sa, idx) in enumerate(sharded)
                    for pi, ji in enumerate(idx)}
        for ji, j in enumerate(jobs):
            if ji in piece_of:
                si, pi = piece_of[ji]
                if _under(j.path, per_rank):
                    raise UnsupportedLeafError(
                        f"cannot save {format_path(j.path[:-1])}: a sharded array inside "
                        "per-rank state is not supported; store a plain array there")
                skey = format_path(j.path[:-1])
                index = [list(b) for b in sharded[si][0].pieces[pi].index]
                self.pieces.setdefault(_piece_key(skey, index), ji)
                self.piece_info[ji] = (skey, index)
            elif _under(j.path, per_rank):
                self.own.append(ji)
            else:
                self.rep.setdefault(format_path(j.path), ji)

    def signature(self) -> str:
        """A digest of the replicated structure (keys, dtypes, shapes) every rank must share."""
        sig = [[k, dtype_name(self.jobs[j].dtype), list(self.jobs[j].shape)]
               for k, j in sorted(self.rep.items())]
        # By tree path: a process may hold no piece of an array (all its shards replicas).
        paths = _sharded_paths(self.node)
        sig += [[paths.get(i, ""), dtype_name(sa.dtype), list(sa.shape)]
                for i, (sa, _idx) in enumerate(self.sharded)]
        return hashlib.sha256(msgpack.packb(sig, use_bin_type=True)).hexdigest()

    def plan(self) -> dict:
        return {"sig": self.signature(),
                "own": sum(self.jobs[j].nbytes for j in self.own),
                "pieces": [[k, self.jobs[j].nbytes] for k, j in self.pieces.items()]}


def _sharded_paths(node: Any, path: Path = (), out: dict | None = None) -> dict[int, str]:
    """Sharded array number -> its tree path, from the encoded tree."""
    out = {} if out is None else out
    if isinstance(node, list) and len(node) == 2 and isinstance(node[0], str):
        tag, payload = node
        if tag == "s":
            out[payload] = format_path(path)
        elif tag == "d":
            for i in range(0, len(payload), 2):
                _sharded_paths(payload[i + 1], (*path, payload[i]), out)
        elif tag in ("l", "t"):
            for i, v in enumerate(payload):
                _sharded_paths(v, (*path, i), out)
    return out


def _node_at(node: Any, path: Path) -> Any:
    for k in path:
        tag, payload = node
        if tag == "d":
            node = next(payload[i + 1] for i in range(0, len(payload), 2) if payload[i] == k)
        else:
            node = payload[k]
    return node


def _offset_by(base: int) -> Callable[[int], int]:
    """The renumbering that shifts a rank's local array numbers by ``base``."""
    return lambda i: base + i


def _renumber(node: Any, mapping: Callable[[int], int]) -> Any:
    if isinstance(node, list) and len(node) == 2 and isinstance(node[0], str):
        tag, payload = node
        if tag == "a":
            return ["a", mapping(payload)]
        if tag == "d":
            return ["d", [v if i % 2 == 0 else _renumber(v, mapping)
                          for i, v in enumerate(payload)]]
        if tag in ("l", "t"):
            return [tag, [_renumber(v, mapping) for v in payload]]
    return node


def _write_file(storage: Storage, directory: str, name: str, jobs: list) -> tuple[bytes, int]:
    """Lay out and write ``jobs`` as one safetensors file, synced; ``(header, size)``."""
    header, size = layout(jobs, file=name)
    fh = storage.create(posixpath.join(directory, name), size)
    try:
        fh.pwrite(header, 0)
        write_jobs(fh, jobs)
        fh.sync()
    finally:
        fh.close()
    return header, size


def _failures(reports: list[dict]) -> list[str]:
    return [f"rank {r}: {m['error']}" for r, m in enumerate(reports) if m.get("error")]


def commit_distributed(coord: Coordinator, storage: Storage, final: str, prepared: tuple, *,
                       metadata: dict | None = None,
                       info: Callable[[WriteStats], dict] | dict | None = None,
                       publish_guard: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                       after_commit: Callable[[], Any] | None = None,
                       ) -> tuple[WriteStats, Any]:
    """Write ``prepared`` (this rank's flattened state) as part of checkpoint ``final``.

    Collective: every rank calls it with its own state.  Returns the write statistics of the
    whole checkpoint and, on every rank, what ``after_commit`` returned on rank 0 (plain
    data; the manager sends its retention result this way).
    """
    t0 = time.perf_counter()
    flat, kinds = prepared
    name = posixpath.basename(final)
    per_rank = per_rank_paths(kinds)
    local = _Local(flat, per_rank)
    plans, tmp = _plan_step(coord, storage, final, local)
    piece_owner, rep_owner = _assignment(plans)
    failure: BaseException | None = None
    try:
        report = _write_part(storage, tmp, coord.rank, local, per_rank, piece_owner, rep_owner)
    except Exception as e:  # reported, so that every rank raises instead of hanging
        report, failure = {"error": f"{type(e).__name__}: {e}"}, e
    try:
        reports = coord.all_gather(f"save {name}: report", report)
        problems = _failures(reports)
        if problems:
            raise CoordinationError(f"unickpt: save {name}: nothing was committed: "
                                    + "; ".join(problems), phase=f"save {name}: report",
                                    ) from failure
    except BaseException:
        if coord.rank == 0:
            _remove(storage, tmp)
        raise
    total = WriteStats(nbytes=sum(e["nbytes"] for m in reports for e in m["entries"]),
                       narrays=sum(len(m["entries"]) for m in reports),
                       seconds=time.perf_counter() - t0)
    outcome: dict = {}
    err: BaseException | None = None
    if coord.rank == 0:
        try:
            outcome = _publish(storage, tmp, final, lambda: _merged_manifest(
                local, per_rank, reports, rep_owner, kinds, metadata, info, total,
                coord.world_size, tmp), publish_guard, after_commit)
        except _Failed as e:
            err, outcome = e.__cause__, e.outcome
    return total, _outcome(coord, name, outcome, err)


class _Failed(Exception):
    def __init__(self, outcome: dict):
        self.outcome = outcome


def _plan_step(coord: Coordinator, storage: Storage, final: str,
               local: _Local) -> tuple[list[dict], str]:
    """Rank 0 stages the directory; every rank learns every rank's plan."""
    name = posixpath.basename(final)
    plan = local.plan()
    tmp = None
    if coord.rank == 0:
        plan["rep"] = [[k, local.jobs[j].nbytes] for k, j in local.rep.items()]
        try:
            tmp = plan["tmp"] = storage.make_temp_dir(final)
        except OSError as e:
            plan["error"] = f"cannot create the staging directory for {final}: {e}"
    try:
        plans = coord.all_gather(f"save {name}: plan", plan)
    except BaseException:
        _remove(storage, tmp)
        raise
    problems = _failures(plans)
    bad_sig = [] if problems else [r for r, p in enumerate(plans) if p["sig"] != plans[0]["sig"]]
    if problems or bad_sig:
        _remove(storage, tmp)
        if bad_sig:
            problems.append(
                f"rank(s) {', '.join(map(str, bad_sig))} hold a state whose replicated "
                "arrays (names, dtypes or shapes) differ from rank 0's; every rank must save "
                "the same structure")
        raise CoordinationError(f"unickpt: save {name}: nothing was committed: "
                                + "; ".join(problems), phase=f"save {name}: plan")
    return plans, plans[0]["tmp"]


def _assignment(plans: list[dict]) -> tuple[dict[str, int], dict[str, int]]:
    """Who writes each sharded piece and each replicated array (the same on every rank)."""
    loads = [int(p["own"]) for p in plans]
    psizes: dict[str, int] = {}
    holders: dict[str, list[int]] = {}
    for r, p in enumerate(plans):
        for k, n in p["pieces"]:
            psizes[k] = n
            holders.setdefault(k, []).append(r)
    piece_owner = assign(psizes, loads, holders)
    return piece_owner, assign(dict((k, n) for k, n in plans[0]["rep"]), loads)


def _write_part(storage: Storage, tmp: str, rank: int, local: _Local, per_rank: list[Path],
                piece_owner: dict[str, int], rep_owner: dict[str, int]) -> dict:
    """Write this rank's file (synced) and describe it for rank 0."""
    if not storage.is_dir(tmp):
        raise OSError(f"rank {rank} does not see the staging directory {tmp} that rank 0 "
                      "created: the run root must be on a filesystem shared by every "
                      "rank (not a node-local path such as /tmp)")
    mine = list(local.own)
    mine += [j for k, j in local.pieces.items() if piece_owner[k] == rank]
    mine += [j for k, j in local.rep.items() if rep_owner[k] == rank]
    jobs = [local.jobs[j] for j in mine]
    fname = rank_file(rank)
    header, size = _write_file(storage, tmp, fname, jobs)
    li = {j: i for i, j in enumerate(mine)}
    return {
        "file": [fname, size, len(header), checksum.digest(header)],
        "entries": [j.entry.to_msg() for j in jobs],
        "rep": {k: li[j] for k, j in local.rep.items() if rep_owner[k] == rank},
        "pieces": [[*local.piece_info[j], li[j]] for k, j in local.pieces.items()
                   if piece_owner[k] == rank],
        "per_rank": [_renumber(_node_at(local.node, p), li.__getitem__) for p in per_rank],
    }


def _publish(storage: Storage, tmp: str, final: str, manifest: Callable[[], bytes],
             publish_guard: Callable[[], ContextManager[Any]],
             after_commit: Callable[[], Any] | None) -> dict:
    """Rank 0: write the manifest (synced), publish, run ``after_commit``."""
    committed = False
    try:
        raw = manifest()
        mh = storage.create(posixpath.join(tmp, MANIFEST_NAME), len(raw))
        try:
            mh.pwrite(raw, 0)
            mh.sync()
        finally:
            mh.close()
        with publish_guard():
            storage.commit(tmp, final)
        committed = True
        return {"ok": True, "after": after_commit() if after_commit else None}
    except Exception as e:
        if not committed:
            _remove(storage, tmp)
        raise _Failed({"ok": committed, "error": f"{type(e).__name__}: {e}"}) from e


def _outcome(coord: Coordinator, name: str, outcome: dict, err: BaseException | None) -> Any:
    """Rank 0 tells every rank how the commit went; every rank raises if it failed."""
    outcome = coord.broadcast(f"save {name}: commit", outcome)
    if err is not None:
        raise err
    if not outcome.get("ok"):
        raise CoordinationError(f"unickpt: save {name}: rank 0 could not commit: "
                                f"{outcome.get('error')}; nothing was committed",
                                phase=f"save {name}: commit")
    if outcome.get("error"):
        raise CoordinationError(f"unickpt: save {name} is committed, but rank 0 failed after "
                                f"the commit (latest pointer or retention): "
                                f"{outcome['error']}", phase=f"save {name}: retention")
    return outcome.get("after")


def fail_plan(coord: Coordinator, name: str, error: BaseException) -> None:
    """Take part in the plan step of save ``name`` reporting ``error`` (best effort)."""
    with contextlib.suppress(CoordinationError):
        coord.all_gather(f"save {name}: plan",
                         {"error": f"{type(error).__name__}: {error}", "sig": ""})


def _remove(storage: Storage, tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(OSError):
            storage.remove_tree(tmp)


def _merged_manifest(local: _Local, per_rank: list[Path], reports: list[dict],
                     rep_owner: dict[str, int], kinds: dict, metadata: dict | None,
                     info: Any, total: WriteStats, world: int, where: str) -> bytes:
    """Rank 0's tree with every array reference pointing at the rank that wrote it."""
    arrays: list[ArrayEntry] = []
    base: list[int] = []
    files: list[FileEntry] = []
    for m in reports:
        base.append(len(arrays))
        for e in m["entries"]:
            arrays.append(ArrayEntry(e["file"], e["name"], e["dtype"], tuple(e["shape"]),
                                     e["offset"], e["nbytes"], e["xxh3"],
                                     e.get("byteorder", "<"), e.get("scalar", False)))
        fname, size, start, hx = m["file"]
        files.append(FileEntry(fname, size, start, hx))
    pieces_of: dict[str, list] = {}
    for r, m in enumerate(reports):
        for skey, index, li in m["pieces"]:
            pieces_of.setdefault(skey, []).append((tuple(tuple(b) for b in index),
                                                   base[r] + li))
    sharded: list[ShardedEntry] = []
    pr = {p: i for i, p in enumerate(per_rank)}

    def rebuild(x: Any, path: Path) -> Any:
        if path in pr:
            k = pr[path]
            return ["l", [_renumber(m["per_rank"][k], _offset_by(base[r]))
                          for r, m in enumerate(reports)]]
        if not (isinstance(x, list) and len(x) == 2 and isinstance(x[0], str)):
            return x
        tag, payload = x
        if tag == "d":
            return ["d", [v if i % 2 == 0 else rebuild(v, (*path, payload[i - 1]))
                          for i, v in enumerate(payload)]]
        if tag in ("l", "t"):
            return [tag, [rebuild(v, (*path, i)) for i, v in enumerate(payload)]]
        if tag == "a":
            key = format_path(local.jobs[payload].path)
            r = rep_owner[key]
            return ["a", base[r] + reports[r]["rep"][key]]
        if tag == "s":
            sa, _idx = local.sharded[payload]
            dt = np.dtype(sa.dtype)
            sharded.append(ShardedEntry(dtype_name(dt), tuple(sa.shape),
                                        sorted(pieces_of.get(format_path(path), [])),
                                        ">" if dt.byteorder == ">" else "<"))
            return ["s", len(sharded) - 1]
        return x

    tree = rebuild(local.node, ())
    info_map = info(total) if callable(info) else dict(info or {})
    info_map = dict(info_map)
    info_map[DIST_INFO] = {"world_size": world, "per_rank": [list(p) for p in per_rank]}
    from .. import __version__

    manifest = Manifest(format_version=FORMAT_VERSION, library_version=__version__, tree=tree,
                        arrays=arrays, sharded=sharded, files=files, kinds=dict(kinds),
                        metadata=plain_data(metadata or {}, "metadata"),
                        info=plain_data(info_map, "info"))
    raw = manifest.to_bytes()
    read_manifest_bytes(raw, where)  # the merged manifest must be one any reader accepts
    return raw
