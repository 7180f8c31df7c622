"""``unickpt ls ROOT``: what a run root holds, and why each checkpoint is kept.

Lists the committed checkpoints (step, time, size (and, for an incremental save, how much
of it that save wrote: the rest is shared with older checkpoints), metrics, which retention rule keeps each
one, and whether it is damaged), what the ``latest`` pointer says, leftovers of interrupted
saves, stray ``step_<N>`` directories, archived runs and the writer lock's holder.  It only
reads; the data comes from :func:`unickpt.cli.root_listing.collect`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from typing import Any

from ._output import human_size, plain_table
from .exit_codes import ExitCode

NAME = "ls"
HELP = "list a run root: checkpoints, the retention rule keeping each, damage, leftovers"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="the run root (holding step_<N> checkpoints)")
    p.add_argument("--json", dest="json_out", action="store_true",
                   help="print JSON instead of a table")


def _metrics(m: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in m.items()) or "-"


def _row(c: dict[str, Any]) -> list[str]:
    when = _dt.datetime.fromtimestamp(c["time"], _dt.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S")
    kept = "-" if c["kept_by"] is None else (", ".join(c["kept_by"]) or "(to delete)")
    state = "ok" if c["damage"] is None else f"DAMAGED: {c['damage']}"
    size = human_size(c["size"])
    if c.get("shared_files") and c.get("written") is not None:  # an incremental save
        size += f" ({human_size(c['written'])} written)"
    return [str(c["step"]), when, size, _metrics(c["metrics"]), kept, state]


def render(data: dict[str, Any]) -> str:
    """The table and notes ``ls`` prints for :func:`~unickpt.cli.root_listing.collect`'s data."""
    from ..policy.naming import format_run, format_step

    lines = [f"checkpoints in {data['root']}"]
    if data["checkpoints"]:
        lines.append(plain_table(["step", "time (UTC)", "size", "metrics", "kept by", "state"],
                                 [_row(c) for c in data["checkpoints"]], right={0, 2}))
    else:
        lines.append("(no committed checkpoints)")
    ndamaged = sum(c["damage"] is not None for c in data["checkpoints"])
    if ndamaged:
        lines.append(f"{ndamaged} damaged checkpoint(s): `unickpt verify` names the damaged "
                     "arrays; a manager resumes an older step with resume=<step>")
    newest = data["checkpoints"][-1]["step"] if data["checkpoints"] else None
    ptr = data["latest_pointer"]
    if ptr is not None:
        agree = ptr == (format_step(newest) if newest is not None else None)
        lines.append(f"latest pointer: {ptr}" + ("" if agree else
                     f"  (stale: the newest committed is {newest}; the scan wins)"))
    if data["locked_by"]:
        lines.append(f"writer lock held by: {data['locked_by']}")
    for t in data["temps"]:
        lines.append(f"uncommitted (interrupted or running save): {t['name']}  age "
                     f"{t['age_seconds']:.0f}s  {'stale' if t['stale'] else 'maybe running'}")
    for name in data["uncommitted"]:
        lines.append(f"uncommitted (not a checkpoint): {name}")
    for r in data["runs"]:
        lines.append(f"archived run {format_run(r['run'])}: {r['checkpoints']} checkpoints"
                     + (f", newest step {r['newest']}" if r["newest"] is not None else ""))
    return "\n".join(lines)


def ls(root: str, json_out: bool = False) -> ExitCode:
    """Print the contents of run root ``root`` (a table, or JSON); return the exit code."""
    from ..storage import storage_for
    from .root_listing import collect

    storage = storage_for(root)
    if not storage.is_dir(storage.resolve(root)):
        print(f"unickpt ls: error: {root} is not a directory (no run root there)",
              file=sys.stderr)
        return ExitCode.UNREADABLE
    data = collect(root, storage)
    print(json.dumps(data) if json_out else render(data))
    return ExitCode.OK


def run(args: argparse.Namespace) -> ExitCode:
    return ls(args.root, args.json_out)
