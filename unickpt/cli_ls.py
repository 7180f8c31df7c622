"""``unickpt ls ROOT``: what a run root holds, and why each checkpoint is kept.

Lists the committed checkpoints (step, time, size, metrics, and which retention rule keeps
each one: the rules are read from the newest checkpoint's recorded options, "-" when they
are unknown), what the ``latest`` pointer says, leftovers of interrupted saves (with whether
a manager would consider them stale), stray uncommitted ``step_<N>`` directories, archived
runs and the writer lock's holder.  It only reads.

>>> import tempfile, numpy as np, unickpt
>>> root = tempfile.mkdtemp()
>>> with unickpt.CheckpointManager(root, keep_last=1) as m:
...     _ = m.save(1, {"w": np.zeros(2)}, metrics={"loss": 0.5})
>>> ls(root, json_out=True)  # doctest: +ELLIPSIS
{"root": ..., "checkpoints": [{"step": 1, ..., "kept_by": ["newest", "last"], ...}], ...}
0
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import sys
import time
from typing import Any

from .manager.run_root import read_info, read_pointer, scan, temp_is_stale
from .policy import retain
from .policy.naming import LOCK_NAME, format_run, format_step, parse_step
from .storage import STALE_TEMP_SECONDS, LocalStorage, parse_temp_name

__all__ = ["ls", "collect"]


def _lock_holder(root: str) -> str | None:
    """The holder line of the writer lock if it is held now, else None (never creates it)."""
    path = os.path.join(root, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
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


def collect(root: str) -> dict[str, Any]:
    """Everything ``ls`` shows, as plain data."""
    storage = LocalStorage()
    root = os.path.abspath(root)
    listing = scan(storage, root)
    infos = {s: read_info(storage, os.path.join(root, format_step(s))) or {}
             for s in listing.steps}
    kept: dict[int, list[str]] | None = None
    newest = infos.get(listing.newest) if listing.steps else None
    opts = (newest or {}).get("retention")
    if isinstance(opts, dict):
        resumed = newest.get("resumed_from")
        try:
            kept = {s: list(r) for s, r in retain(
                listing.steps, {s: i.get("metrics") or {} for s, i in infos.items()},
                keep_last=opts.get("keep_last"), keep_every=opts.get("keep_every"),
                keep_best=opts.get("keep_best"), best_metric=opts.get("best_metric"),
                best_mode=opts.get("best_mode", "min"),
                protected=[resumed] if isinstance(resumed, int) else []).items()}
        except (TypeError, ValueError):  # options recorded by another version: unknown
            kept = None
    checkpoints = []
    for s in listing.steps:
        path = os.path.join(root, format_step(s))
        info = infos[s]
        try:
            size, mtime = storage.tree_size(path), storage.mtime(path)
        except OSError:
            size, mtime = 0, 0.0
        t = info.get("time")
        checkpoints.append({
            "step": s, "path": path,
            "time": float(t) if isinstance(t, (int, float)) else mtime,
            "size": size, "metrics": info.get("metrics") or {},
            "kept_by": kept.get(s, []) if kept is not None else None,
            "readable": bool(info),
        })
    holder = _lock_holder(root)
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
        steps = sorted(s for n in storage.list_dir(rdir) if (s := parse_step(n)) is not None)
        runs.append({"run": k, "path": rdir, "checkpoints": len(steps),
                     "newest": steps[-1] if steps else None})
    return {"root": root, "checkpoints": checkpoints,
            "latest_pointer": read_pointer(storage, root),
            "uncommitted": list(listing.uncommitted) + list(listing.trash),
            "temps": temps, "runs": runs, "locked_by": holder}


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _metrics(m: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in m.items()) or "-"


def ls(root: str, json_out: bool = False) -> int:
    """Print the contents of run root ``root`` (a table, or JSON); return an exit code:
    0 on success, 2 when ``root`` is not a directory."""
    if not os.path.isdir(root):
        print(f"unickpt ls: {root} is not a directory (no run root there)", file=sys.stderr)
        return 2
    data = collect(root)
    if json_out:
        print(json.dumps(data, sort_keys=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120, soft_wrap=False)
    table = Table(title=f"checkpoints in {data['root']}")
    for col in ("step", "time (UTC)", "size", "metrics", "kept by"):
        table.add_column(col, justify="right" if col in ("step", "size") else "left")
    for c in data["checkpoints"]:
        when = _dt.datetime.fromtimestamp(c["time"], _dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S")
        kept = "-" if c["kept_by"] is None else (", ".join(c["kept_by"]) or "(to delete)")
        if not c["readable"]:
            kept += " [damaged manifest]"
        table.add_row(str(c["step"]), when, _size(c["size"]), _metrics(c["metrics"]), kept)
    console.print(table)
    newest = data["checkpoints"][-1]["step"] if data["checkpoints"] else None
    ptr = data["latest_pointer"]
    if ptr is not None:
        agree = ptr == (format_step(newest) if newest is not None else None)
        console.print(f"latest pointer: {ptr}" + ("" if agree else
                      f"  (stale: the newest committed is {newest}; the scan wins)"))
    if data["locked_by"]:
        console.print(f"writer lock held by: {data['locked_by']}")
    for t in data["temps"]:
        console.print(f"uncommitted (interrupted or running save): {t['name']}  age "
                      f"{t['age_seconds']:.0f}s  {'stale' if t['stale'] else 'maybe running'}")
    for name in data["uncommitted"]:
        console.print(f"uncommitted (not a checkpoint): {name}")
    for r in data["runs"]:
        console.print(f"archived run {format_run(r['run'])}: {r['checkpoints']} checkpoints"
                      + (f", newest step {r['newest']}" if r["newest"] is not None else ""))
    return 0


def _register() -> None:
    import typer

    from .cli import app

    @app.command("ls")
    def ls_command(
        root: str = typer.Argument(..., help="The run root (holding step_<N> checkpoints)."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """List a run root: checkpoints, the retention rule keeping each, leftovers, archives."""
        raise typer.Exit(ls(root, json_out))


_register()
