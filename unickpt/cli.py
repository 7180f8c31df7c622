"""The ``unickpt`` command line: ``inspect``, ``verify`` and ``diff`` checkpoints.

Exit status: 0 success; 1 the answer is "no" (corrupt leaves, checkpoints differ); 2 the
checkpoint cannot be read at all (missing, damaged manifest, unknown format version).

Other modules add commands to the same :data:`app`::

    from unickpt.cli import app

    @app.command()
    def ls(root: str) -> None: ...

and list their module in :data:`COMMAND_MODULES` (or, for a third-party package, register it
under the ``unickpt.cli`` entry-point group) so that :func:`main` imports it before dispatch.

>>> from typer.testing import CliRunner
>>> import tempfile, numpy as np, unickpt
>>> p = tempfile.mkdtemp() + "/ck"
>>> _ = unickpt.save(p, {"w": np.zeros(2)})
>>> CliRunner().invoke(app, ["verify", p]).exit_code
0
"""

from __future__ import annotations

import importlib
import json
import math
from importlib.metadata import entry_points
from pathlib import Path as FsPath
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table
from rich.tree import Tree

from .errors import CorruptCheckpointError, UnickptError
from .format.reader import CheckpointReader
from .testing.compare import TreeDifference, diff_trees
from .tree import Path, format_path, iter_leaves

__all__ = ["app", "main", "COMMAND_MODULES"]

#: Modules imported by :func:`main` so that the commands they define with ``@app.command()``
#: exist (e.g. the run-root commands ``ls`` / ``migrate``); missing ones are skipped.
COMMAND_MODULES: list[str] = ["unickpt.cli_ls", "unickpt.cli_convert", "unickpt.cli_migrate"]

app = typer.Typer(
    name="unickpt",
    help="Inspect, verify and compare unickpt checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_OK, EXIT_NO, EXIT_UNREADABLE = 0, 1, 2
PROGRESS_MIN_BYTES = 256 << 20  # show a progress bar only when verifying this much or more


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _unreadable(e: Exception) -> typer.Exit:
    _err_console().print(f"[bold red]error:[/] {type(e).__name__}: {escape(str(e))}")
    return typer.Exit(EXIT_UNREADABLE)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _jsonable(x: Any) -> Any:
    """Manifest values as strict JSON (bytes as hex, non-finite floats as strings)."""
    if isinstance(x, bytes):
        return {"bytes_hex": x.hex()}
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ------------------------------------------------------------------ inspect
class _Ref:
    """A placeholder for an array leaf while the manifest tree is decoded without data."""

    def __init__(self, kind: str, dtype: str, shape: tuple[int, ...], nbytes: int):
        self.kind, self.dtype, self.shape, self.nbytes = kind, dtype, shape, nbytes

    def label(self) -> str:
        tag = " [magenta]sharded[/]" if self.kind == "sharded" else ""
        return f"[cyan]{escape(self.dtype)}[/]{escape(str(list(self.shape)))} " \
            f"[dim]{_size(self.nbytes)}[/]{tag}"


def _skeleton(r: CheckpointReader) -> Any:
    m = r.manifest

    def arr(i: int, _p: Path) -> _Ref:
        e = m.arrays[i]
        return _Ref("array", e.dtype, e.shape, e.nbytes)

    def sharded(i: int, _p: Path) -> _Ref:
        s = m.sharded[i]
        return _Ref("sharded", s.dtype, s.shape, sum(m.arrays[a].nbytes for _, a in s.pieces))

    return r._decode(arr, sharded)


def _add_nodes(node: Tree, x: Any) -> None:
    items = (x.items() if isinstance(x, dict) else enumerate(x))
    for k, v in items:
        _add_node(node, format_path((k,)), v)


def _add_node(node: Tree, key: str, v: Any) -> None:
    if isinstance(v, (dict, list, tuple)):
        kind = {dict: "dict", list: "list", tuple: "tuple"}[type(v)]
        _add_nodes(node.add(f"[bold]{escape(key)}[/] [dim]{kind}({len(v)})[/]"), v)
    elif isinstance(v, _Ref):
        node.add(f"[bold]{escape(key)}[/]: {v.label()}")
    else:
        text = repr(v)
        text = text if len(text) <= 80 else text[:77] + "..."
        node.add(f"[bold]{escape(key)}[/]: [green]{type(v).__name__}[/] = {escape(text)}")


@app.command("inspect")
def inspect_cmd(
    ckpt: Annotated[FsPath, typer.Argument(help="checkpoint directory")],
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Show a checkpoint's tree (dtypes, shapes, sizes, scalar values), metadata and info."""
    from .api import inspect as _inspect

    try:
        summary = _inspect(ckpt)
        with CheckpointReader(ckpt) as r:
            skeleton = _skeleton(r)
    except (UnickptError, OSError) as e:
        raise _unreadable(e) from None
    if as_json:
        doc = {
            "path": summary.path, "format_version": summary.format_version,
            "library_version": summary.library_version, "total_bytes": summary.total_bytes,
            "file_bytes": summary.file_bytes,
            "leaves": [{"path": lf.path, "kind": lf.kind, "dtype": lf.dtype,
                        "shape": list(lf.shape) if lf.shape is not None else None,
                        "nbytes": lf.nbytes, "value": _jsonable(lf.value)}
                       for lf in summary.leaves],
            "metadata": _jsonable(summary.metadata), "info": _jsonable(summary.info),
            "kinds": summary.kinds,
        }
        typer.echo(json.dumps(doc, ensure_ascii=False, indent=1))
        return
    out = _console()
    narrays = sum(1 for lf in summary.leaves if lf.kind in ("array", "sharded"))
    out.print(f"[bold]{escape(summary.path)}[/]")
    out.print(f"format v{summary.format_version} · written by unickpt "
              f"{escape(summary.library_version)} · {len(summary.leaves)} leaves "
              f"({narrays} array leaves, {_size(summary.total_bytes)} of array data, "
              f"{_size(summary.file_bytes)} on disk)")
    root = Tree("[bold]tree[/]")
    if isinstance(skeleton, (dict, list, tuple)):
        _add_nodes(root, skeleton)
    else:
        _add_node(root, "<root>", skeleton)
    out.print(root)
    for title, d in (("kinds", summary.kinds), ("metadata", summary.metadata),
                     ("info", summary.info)):
        if d:
            out.print(f"[bold]{title}[/]")
            for k, v in d.items():
                out.print(f"  {escape(str(k))}: {escape(repr(v))}")


# ------------------------------------------------------------------ verify
@app.command("verify")
def verify_cmd(
    ckpt: Annotated[FsPath, typer.Argument(help="checkpoint directory")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Recompute every array checksum.  Exit 1 naming the damaged leaves, 2 if unreadable."""
    err = _err_console()
    try:
        with CheckpointReader(ckpt) as r:
            total = sum(a.nbytes for a in r.manifest.arrays)
            narrays = len(r.manifest.arrays)
            with Progress(TextColumn("verifying"), BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), console=err, transient=True,
                          disable=quiet or total < PROGRESS_MIN_BYTES) as progress:
                task = progress.add_task("verify", total=total)
                bad = r.verify_all(lambda n: progress.advance(task, n))
    except (UnickptError, OSError) as e:
        raise _unreadable(e) from None
    out = _console()
    if bad:
        out.print(f"[bold red]CORRUPT[/] {escape(str(ckpt))}: {len(bad)} of {narrays} "
                  "arrays damaged (checksum mismatch, truncated or missing data):")
        for leaf in bad:
            out.print(f"  {escape(leaf)}")
        out.print("restore from another checkpoint")
        raise typer.Exit(EXIT_NO)
    out.print(f"[bold green]OK[/] {escape(str(ckpt))}: {narrays} arrays, {_size(total)} verified")


# ------------------------------------------------------------------ diff
_STATUS = {"value": "differs", "type": "differs", "missing": "missing in B",
           "extra": "extra in B"}


def _diff_json(d: TreeDifference) -> dict:
    return {"path": d.path, "status": _STATUS.get(d.kind, d.kind), "detail": d.detail,
            "ndiff": d.count, "max_abs_diff": _jsonable(d.max_abs),
            "first_index": list(d.first_index) if d.first_index is not None else None}


@app.command("diff")
def diff_cmd(
    a: Annotated[FsPath, typer.Argument(help="first checkpoint")],
    b: Annotated[FsPath, typer.Argument(help="second checkpoint")],
    show_equal: Annotated[bool, typer.Option("--all", help="also list equal leaves")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the comparison as JSON")] = False,
) -> None:
    """Compare two checkpoints leaf by leaf.  Exit 0 only if they are bitwise equal."""
    from .api import load

    try:
        # memory-mapped (pages, not copies, for big checkpoints) but checksummed
        ta, tb = load(a, mmap=True, verify=True), load(b, mmap=True, verify=True)
    except (UnickptError, OSError) as e:
        raise _unreadable(e) from None
    # The same bit-level comparison as unickpt.testing.assert_trees_equal (NaNs by their bits,
    # -0.0 != 0.0), plus structure: list vs tuple and key order count as differences here.
    bad = diff_trees(ta, tb, names=("A", "B"), exact_structure=True)
    nleaves = len(set(format_path(p) for p, _ in iter_leaves(ta))
                  | set(format_path(p) for p, _ in iter_leaves(tb)))
    differing = {d.path for d in bad}
    equal = sorted(format_path(p) for p, _ in iter_leaves(ta)
                   if format_path(p) not in differing) if show_equal else []
    if as_json:
        rows = [_diff_json(d) for d in bad] + [
            {"path": p, "status": "equal", "detail": "", "ndiff": 0, "max_abs_diff": None,
             "first_index": None} for p in equal]
        typer.echo(json.dumps({"equal": not bad, "a": str(a), "b": str(b), "leaves": rows},
                              indent=1))
        raise typer.Exit(EXIT_NO if bad else EXIT_OK)
    out = _console()
    if bad or equal:
        table = Table("path", "status", "detail", show_lines=False)
        for d in bad:
            status = _STATUS.get(d.kind, d.kind)
            color = "red" if status == "differs" else "yellow"
            table.add_row(escape(d.path), f"[{color}]{status}[/]", escape(d.detail))
        for p in equal:
            table.add_row(escape(p), "[green]equal[/]", "")
        out.print(table)
    if bad:
        out.print(f"[bold red]DIFFERENT[/]: {len(bad)} differences over {nleaves} leaves")
        raise typer.Exit(EXIT_NO)
    out.print(f"[bold green]IDENTICAL[/]: {nleaves} leaves bitwise equal")


# ------------------------------------------------------------------ entry point
def _load_command_modules() -> None:
    for mod in COMMAND_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    for ep in entry_points(group="unickpt.cli"):
        try:
            ep.load()
        except Exception as e:  # a broken plugin must not take the built-in commands down
            _err_console().print(f"warning: CLI plugin {ep.name!r} failed to load: {e}")


def main(argv: list[str] | None = None) -> None:
    """Run the ``unickpt`` command line (the ``unickpt`` console script)."""
    _load_command_modules()
    try:
        app(args=argv, prog_name="unickpt")
    except CorruptCheckpointError as e:  # last resort: never a raw traceback for a bad file
        raise SystemExit(_unreadable(e).exit_code) from None
