"""What ``unickpt ls`` shows, as plain data (no printing here).

All reading goes through the manager's :class:`~unickpt.manager.run_root.RunRoot` and its
storage: :func:`describe_checkpoint` adds what ``ls`` shows beyond
:meth:`RunRoot.describe <unickpt.manager.run_root.RunRoot.describe>` (damage found without
reading array data) and :func:`collect` the whole listing.  Nothing is written, and the
writer lock is only probed.

>>> import tempfile, numpy as np, unickpt
>>> root = tempfile.mkdtemp()
>>> with unickpt.CheckpointManager(root, keep_last=1) as m:
...     _ = m.save(1, {"w": np.zeros(2)}, metrics={"loss": 0.5})
>>> c = collect(root)["checkpoints"][0]
>>> c["step"], c["kept_by"], c["readable"], c["damage"]
(1, ['newest', 'last'], True, None)
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Any

from ..format.manifest import MANIFEST_NAME
from ..manager.run_root import RunRoot, read_manifest, temp_is_stale
from ..policy import retain
from ..policy.naming import LOCK_NAME, format_run, format_step, parse_step
from ..storage import STALE_TEMP_SECONDS, LocalStorage, Storage, parse_temp_name

__all__ = ["collect", "describe_checkpoint"]


def _lock_holder(storage: Storage, root: str) -> str | None:
    """The holder line of the writer lock if it is held now, else None (never creates it).

    Probed with an ``flock`` on local roots; on object stores, the lease object's holder
    while it has not expired."""
    if not isinstance(storage, LocalStorage):
        return _lease_holder(storage, root)
    try:
        fd = os.open(os.path.join(root, LOCK_NAME), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return os.pread(fd, 512, 0).decode(errors="replace").strip() or "unknown holder"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lease_holder(storage: Storage, root: str) -> str | None:
    import json
    import time

    try:
        h = json.loads(storage.read_bytes(os.path.join(root, LOCK_NAME)))
        if float(h["expires"]) < time.time():
            return None
        return f"pid={h['pid']} host={h['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _file_sizes(storage: Storage, path: str) -> dict[str, int]:
    """Sizes of the regular files directly inside checkpoint ``path`` (a checkpoint is flat)."""
    sizes = {}
    for name in storage.list_dir(path):
        try:
            fh = storage.open(os.path.join(path, name))
        except OSError:  # not a regular file, or removed meanwhile
            continue
        sizes[name] = fh.size
        fh.close()
    return sizes


def describe_checkpoint(storage: Storage, root: str, step: int) -> dict[str, Any]:
    """One committed checkpoint: info, size, time and ``damage`` (None when its manifest
    reads and every array file has the size the manifest gives; checksums are not read,
    that is ``unickpt verify``)."""
    path = os.path.join(root, format_step(step))
    try:
        sizes, mtime = _file_sizes(storage, path), storage.mtime(path)
    except OSError:
        sizes, mtime = {}, 0.0
    info: dict = {}
    damage = None
    try:
        m = read_manifest(storage, path)
    except Exception as e:  # noqa: BLE001 - any unreadable manifest is reported, not raised
        damage = f"manifest unreadable ({type(e).__name__})"
    else:
        info = m.info if isinstance(m.info, dict) else {}
        for f in m.files:
            if f.name not in sizes:
                damage = f"array file {f.name} missing"
            elif sizes[f.name] != f.size:
                damage = (f"array file {f.name} is {sizes[f.name]} bytes, "
                          f"the manifest says {f.size}")
            if damage:
                break
    t = info.get("time")
    written, shared = info.get("written_bytes"), info.get("shared_files")
    return {"step": step, "path": path,
            "time": float(t) if isinstance(t, (int, float)) else mtime,
            "size": sum(sizes.values()),
            # array bytes this save wrote; the rest of `size` is shared with older checkpoints
            # (hard links: deleting either never affects the other)
            "written": written if isinstance(written, int) else None,
            "shared_files": shared if isinstance(shared, int) else 0,
            "metrics": info.get("metrics") or {}, "info": info,
            "readable": not (damage or "").startswith("manifest"), "damage": damage}


def _kept_by(steps: list[int], described: dict[int, dict]) -> dict[int, list[str]] | None:
    """Which retention rule keeps each step, from the newest checkpoint's recorded options
    (None when they are unknown: plain saves, or options of another version)."""
    newest = described[steps[-1]]["info"] if steps else {}
    opts = newest.get("retention")
    if not isinstance(opts, dict):
        return None
    resumed = newest.get("resumed_from")
    try:
        return {s: list(r) for s, r in retain(
            steps, {s: d["metrics"] for s, d in described.items()},
            keep_last=opts.get("keep_last"), keep_every=opts.get("keep_every"),
            keep_best=opts.get("keep_best"), best_metric=opts.get("best_metric"),
            best_mode=opts.get("best_mode", "min"),
            # as the manager: the resumed-from step is protected only until a newer commit
            protected=[resumed] if isinstance(resumed, int) and resumed >= steps[-1]
            else []).items()}
    except (TypeError, ValueError):
        return None


def collect(root: str, storage: Storage | None = None) -> dict[str, Any]:
    """Everything ``ls`` shows, as JSON-ready data."""
    rr = RunRoot(root, storage)
    storage, root = rr.storage, rr.path
    listing = rr.scan()
    described = {s: describe_checkpoint(storage, root, s) for s in listing.steps}
    kept = _kept_by(list(listing.steps), described)
    checkpoints = []
    for s in listing.steps:
        c = dict(described[s])
        del c["info"]
        c["kept_by"] = kept.get(s, []) if kept is not None else None
        checkpoints.append(c)
    now = time.time()
    temps = []
    for name in listing.temps:
        parsed = parse_temp_name(name)
        try:
            age = now - storage.mtime(os.path.join(root, name))
        except OSError:
            continue
        temps.append({"name": name, "target": parsed[0] if parsed else None,
                      "host": parsed[1] if parsed else None,
                      "pid": parsed[2] if parsed else None, "age_seconds": round(age, 1),
                      "stale": temp_is_stale(name, age, threshold=STALE_TEMP_SECONDS)})
    runs = []
    for k in listing.runs:
        rdir = os.path.join(root, format_run(k))
        steps = sorted(st for n in storage.list_dir(rdir) if (st := parse_step(n)) is not None
                       and storage.is_file(os.path.join(rdir, n, MANIFEST_NAME)))
        runs.append({"run": k, "path": rdir, "checkpoints": len(steps),
                     "newest": steps[-1] if steps else None})
    return {"root": root, "checkpoints": checkpoints,
            "latest_pointer": rr.read_pointer(),
            "uncommitted": list(listing.uncommitted) + list(listing.trash),
            "temps": temps, "runs": runs, "locked_by": _lock_holder(storage, root)}
