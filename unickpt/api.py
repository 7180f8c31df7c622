"""One-checkpoint functions: save, load, inspect, verify.

>>> import tempfile, numpy as np, unickpt
>>> d = tempfile.mkdtemp()
>>> info = unickpt.save(f"{d}/step_1", {"w": np.eye(2, dtype=np.float32), "step": 1},
...                     metadata={"note": "demo"})
>>> unickpt.load(f"{d}/step_1")["step"]
1
>>> [leaf.path for leaf in unickpt.inspect(f"{d}/step_1").leaves]
['w', 'step']
>>> unickpt.verify(f"{d}/step_1").ok
True
"""

from __future__ import annotations

import operator
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointExistsError, CorruptCheckpointError, UnsupportedLeafError
from .format import checksum
from .format.commit import commit_checkpoint, prepare
from .format.gcpause import WHOLE_CALL_BYTES, GcPause
from .format.reader import CheckpointReader, is_committed
from .state import to_tree
from .storage import Storage, storage_for
from .tree import Path, format_path

_nbytes = operator.attrgetter("nbytes")

__all__ = ["save", "load", "inspect", "verify", "SaveInfo", "Inspection", "LeafInfo",
           "VerifyReport"]


@dataclass(frozen=True)
class SaveInfo:
    """What :func:`save` wrote."""

    path: str
    nbytes: int
    narrays: int
    seconds: float

    @property
    def bandwidth(self) -> float:
        """Array bytes per second of the whole save (fsync included)."""
        return self.nbytes / self.seconds if self.seconds > 0 else float("inf")


def save(path: str | os.PathLike, tree: Any, *, metadata: dict | None = None,
         overwrite: bool = False, storage: Storage | None = None) -> SaveInfo:
    """Write one checkpoint at ``path`` atomically.

    ``tree`` is a state tree; framework objects (torch modules, JAX arrays, ...) are converted
    by their adapter.  ``metadata`` is plain user data (str/number/bool/None/bytes/list/dict).
    The checkpoint appears at ``path`` complete or not at all.  An existing committed
    checkpoint there is refused (``CheckpointExistsError``) unless ``overwrite=True``, which
    replaces it atomically.  ``storage`` is where bytes live (default: the local
    filesystem; see docs/storage.md).
    """
    return save_recorded(path, tree, metadata=metadata, overwrite=overwrite, storage=storage)


def save_recorded(path: str | os.PathLike, tree: Any, *, info: dict | None = None,
                  metadata: dict | None = None, overwrite: bool = False,
                  storage: Storage | None = None) -> SaveInfo:
    """:func:`save`, recording ``info`` (the manifest's ``info`` map: step, provenance) too.

    Internal (not re-exported by ``unickpt``): for the project's own tools that write a
    checkpoint standing for a training step, such as the Orbax converter.
    """
    t0 = time.perf_counter()
    storage = storage or storage_for(path)
    final = storage.resolve(path)
    checksum.require(f"saving {final}")  # before any I/O: nothing is half-written without it
    if storage.exists(final):
        if not overwrite:
            raise CheckpointExistsError(
                f"{final} already exists; pass overwrite=True to replace it atomically")
        if not is_committed(final, storage):
            raise CheckpointExistsError(
                f"{final} exists and is not a unickpt checkpoint; refusing to replace it")
    with GcPause() as pause:  # see gcpause.WHOLE_CALL_BYTES
        try:
            neutral, kinds = to_tree(tree)
        except RecursionError:
            raise UnsupportedLeafError(
                f"cannot save {final}: the state contains a reference cycle or is nested far "
                "too deeply to be a state tree") from None
        prepared = prepare(neutral, kinds)  # validates every leaf before anything is written
        if sum(map(_nbytes, prepared[0][1])) > WHOLE_CALL_BYTES:
            pause.end()
        stats = commit_checkpoint(storage, final, prepared, metadata=metadata, info=info,
                                  replace=overwrite)
        del neutral, prepared  # freed while paused: nothing left for a deferred collection
    return SaveInfo(final, stats.nbytes, stats.narrays, time.perf_counter() - t0)


def load(path: str | os.PathLike, *, mmap: bool = False, verify: bool | None = None,
         storage: Storage | None = None) -> Any:
    """Read a checkpoint as a tree of numpy arrays and Python values.

    With ``mmap=True`` arrays are read-only views of the file (zero copy); otherwise they are
    fresh arrays.  ``verify`` (default: on unless ``mmap``) checks every array's checksum and
    raises :class:`~unickpt.CorruptCheckpointError` naming the damaged leaf.  Needs only
    numpy, msgpack and ml_dtypes.

    ``load(path, mmap=True)`` does **not** verify array data by default (that would read every
    page the map is meant to leave untouched): damaged bytes then come back as wrong values,
    silently.  Pass ``verify=True`` (or run :func:`verify` once) when the data must be
    trusted.  The manifest and the files' headers are checked either way.
    """
    with GcPause() as pause:  # see gcpause.WHOLE_CALL_BYTES
        r = CheckpointReader(path, storage)
        try:
            if sum(r.arrays.nbytes) > WHOLE_CALL_BYTES:
                pause.end()
            return r.tree(mmap=mmap, verify=verify)
        finally:
            r.close()
            del r  # the reader's entries and skeleton are freed before collection resumes


@dataclass(frozen=True)
class LeafInfo:
    """One leaf in :func:`inspect`'s summary."""

    path: str
    kind: str  # "array", "sharded", "scalar", or the Python type for scalars
    dtype: str | None
    shape: tuple[int, ...] | None
    nbytes: int
    value: Any = None  # scalar leaves only


@dataclass(frozen=True)
class Inspection:
    """Summary of a checkpoint's manifest (no array data is read)."""

    path: str
    format_version: int
    library_version: str
    leaves: list[LeafInfo]
    kinds: dict[str, str]
    metadata: dict
    info: dict
    total_bytes: int
    file_bytes: int = 0

    def __str__(self) -> str:
        lines = [f"{self.path}  (format v{self.format_version}, unickpt "
                 f"{self.library_version}, {self.total_bytes} array bytes)"]
        for leaf in self.leaves:
            if leaf.kind in ("array", "sharded"):
                lines.append(f"  {leaf.path}: {leaf.dtype}{list(leaf.shape or ())} "
                             f"({leaf.nbytes} B){' sharded' if leaf.kind == 'sharded' else ''}")
            else:
                lines.append(f"  {leaf.path}: {leaf.kind} = {leaf.value!r}")
        return "\n".join(lines)


def inspect(path: str | os.PathLike, *, storage: Storage | None = None) -> Inspection:
    """Summarise a checkpoint: every leaf's path, kind, dtype, shape and size; metadata."""
    with CheckpointReader(path, storage) as r:
        m = r.manifest
        leaves: list[LeafInfo] = []

        def arr(i: int, p: Path) -> Any:
            e = m.arrays[i]
            leaves.append(LeafInfo(format_path(p), "array", e.dtype, e.shape, e.nbytes))
            return None

        def sharded(i: int, p: Path) -> Any:
            s = m.sharded[i]
            nb = sum(m.arrays[a].nbytes for _, a in s.pieces)
            leaves.append(LeafInfo(format_path(p), "sharded", s.dtype, s.shape, nb))
            return None

        tree = r.map_tree(arr, sharded)
        from .tree import iter_leaves

        order = {lf.path: lf for lf in leaves}
        out: list[LeafInfo] = []
        for p, v in iter_leaves(tree):
            name = format_path(p)
            if name in order:
                out.append(order.pop(name))
            else:
                out.append(LeafInfo(name, type(v).__name__, None, None, 0, v))
        out.extend(order.values())
        return Inspection(
            path=r.path, format_version=m.format_version, library_version=m.library_version,
            leaves=out, kinds={format_path(p): k for p, k in m.kinds.items()},
            metadata=m.metadata, info=m.info,
            total_bytes=sum(r.arrays.nbytes),
            file_bytes=sum(f.size for f in m.files))


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify` (raised as an error unless ``raise_on_error=False``)."""

    path: str
    narrays: int
    nbytes: int
    bad: list[str] = field(default_factory=list)
    #: array files damaged as a whole (truncated, padded, damaged header) -> why
    files: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.bad or self.files)


def verify(path: str | os.PathLike, *, raise_on_error: bool = True,
           progress: Callable[[int], None] | None = None,
           storage: Storage | None = None) -> VerifyReport:
    """Recompute every checksum; raise :class:`~unickpt.CorruptCheckpointError` naming bad leaves.

    Also catches missing and truncated array files and a damaged manifest.
    ``progress`` is called with the byte count of each array as it is checked.
    """
    with CheckpointReader(path, storage) as r:
        bad = r.verify_all(progress)
        report = VerifyReport(r.path, len(r.manifest.arrays),
                              sum(r.arrays.nbytes), bad,
                              dict(r.file_damage))
    if not report.ok and raise_on_error:
        files = "".join(f"; {why}" for why in report.files.values())
        raise CorruptCheckpointError(
            f"{report.path}: {len(bad)} damaged leaves: {', '.join(bad[:20])}"
            f"{' ...' if len(bad) > 20 else ''}{files}; restore from another checkpoint",
            path=report.path, leaves=bad)
    return report
