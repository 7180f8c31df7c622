"""``unickpt diff A B``: compare two checkpoints leaf by leaf, bit for bit.

Tree paths are printed whole, never cut to the terminal's width: one difference per
line, ``STATUS  PATH  detail`` (long lines wrap in the terminal, they are not truncated).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

from ._output import error, jsonable, progress_bar, remote, want_progress
from .exit_codes import ExitCode

NAME = "diff"
HELP = "compare two checkpoints leaf by leaf; exit 0 only if they are bitwise equal"
_STATUS = {"value": "differs", "type": "differs", "missing": "missing in B",
           "extra": "extra in B"}
#: Show a progress bar (object stores, stderr a terminal) from this many bytes to download.
PROGRESS_MIN_BYTES = 256 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", help="first checkpoint")
    p.add_argument("b", help="second checkpoint")
    p.add_argument("--all", dest="show_equal", action="store_true",
                   help="also list equal leaves")
    p.add_argument("--json", dest="as_json", action="store_true",
                   help="print the comparison as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _row(d: Any) -> dict[str, Any]:
    return {"path": d.path, "status": _STATUS.get(d.kind, d.kind), "detail": d.detail,
            "ndiff": d.count, "max_abs_diff": jsonable(d.max_abs),
            "first_index": list(d.first_index) if d.first_index is not None else None}


def _download_bytes(path: str) -> int:
    """The bytes of ``path``'s array files when it is on an object store (else 0)."""
    from ..format.reader import CheckpointReader
    from ..storage import is_url

    if not is_url(path):
        return 0
    with CheckpointReader(path) as r:
        return sum(f.size for f in r.manifest.files) if remote(r.storage) else 0


def _counting(advance: Any, on: bool) -> contextlib.AbstractContextManager[Any]:
    if not on:
        return contextlib.nullcontext()
    from ..storage.objio import observe_reads

    return observe_reads(advance)


def run(args: argparse.Namespace) -> ExitCode:
    from ..api import load
    from ..errors import UnickptError
    from ..testing.compare import diff_trees
    from ..tree import format_path, iter_leaves

    try:
        # on object stores the array files are downloaded: a bar counts the bytes as they come
        work = _download_bytes(args.a) + _download_bytes(args.b)
        show = work > 0 and want_progress(args.quiet, work, PROGRESS_MIN_BYTES)
        with progress_bar("reading", work, enabled=show) as advance, \
                _counting(advance, work > 0):
            # memory-mapped (pages, not copies, for big checkpoints) but checksummed
            ta = load(args.a, mmap=True, verify=True)
            tb = load(args.b, mmap=True, verify=True)
    except (UnickptError, OSError) as e:
        return ExitCode(error(NAME, e, ExitCode.UNREADABLE))
    # The same bit-level comparison as unickpt.testing.assert_trees_equal (NaNs by their bits,
    # -0.0 != 0.0), plus structure: list vs tuple and key order count as differences here.
    bad = diff_trees(ta, tb, names=("A", "B"), exact_structure=True)
    paths_a = [format_path(p) for p, _ in iter_leaves(ta)]
    nleaves = len(set(paths_a) | {format_path(p) for p, _ in iter_leaves(tb)})
    differing = {d.path for d in bad}
    equal = sorted(p for p in paths_a if p not in differing) if args.show_equal else []
    rows = [_row(d) for d in bad] + [
        {"path": p, "status": "equal", "detail": "", "ndiff": 0, "max_abs_diff": None,
         "first_index": None} for p in equal]
    if args.as_json:
        print(json.dumps({"equal": not bad, "a": args.a, "b": args.b, "leaves": rows},
                         indent=1))
        return ExitCode.NO if bad else ExitCode.OK
    width = max((len(r["status"]) for r in rows), default=0)
    for r in rows:
        print(f"{r['status']:<{width}}  {r['path']}" + (f"  {r['detail']}" if r["detail"]
                                                       else ""))
    if bad:
        print(f"DIFFERENT: {len(bad)} differences over {nleaves} leaves")
        return ExitCode.NO
    print(f"IDENTICAL: {nleaves} leaves bitwise equal")
    return ExitCode.OK
