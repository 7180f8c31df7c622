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
import struct
from importlib.metadata import entry_points
from pathlib import Path as FsPath
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table
from rich.tree import Tree

from .errors import CorruptCheckpointError, UnickptError
from .format.dtypes import dtype_name
from .format.reader import CheckpointReader
from .tree import Path, format_path

__all__ = ["app", "main", "COMMAND_MODULES", "diff_trees", "LeafDiff"]

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
class LeafDiff:
    """How one tree path compares between two checkpoints."""

    __slots__ = ("path", "status", "detail", "ndiff", "max_abs_diff", "first_index")

    def __init__(self, path: str, status: str, detail: str = "", ndiff: int = 0,
                 max_abs_diff: float | None = None, first_index: tuple[int, ...] | None = None):
        self.path, self.status, self.detail = path, status, detail
        self.ndiff, self.max_abs_diff, self.first_index = ndiff, max_abs_diff, first_index

    def to_json(self) -> dict:
        return {"path": self.path, "status": self.status, "detail": self.detail,
                "ndiff": self.ndiff, "max_abs_diff": _jsonable(self.max_abs_diff),
                "first_index": list(self.first_index) if self.first_index is not None else None}


def _walk(x: Any, path: Path = ()):
    """Yield ``(path, node)`` for containers and leaves alike, so structure is compared too."""
    yield path, x
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _walk(v, (*path, k))
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _walk(v, (*path, i))


def _kind(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return "array"
    if isinstance(x, np.generic):
        return f"numpy.{type(x).__name__}"
    return type(x).__name__


def _element_bytes(a: np.ndarray) -> np.ndarray:
    """``(n, itemsize)`` uint8 view of the value-carrying bytes of each element."""
    b = np.ascontiguousarray(a).reshape(-1)
    u = b.view(np.uint8).reshape(b.size, a.dtype.itemsize) if a.dtype.itemsize else \
        np.zeros((b.size, 0), np.uint8)
    if a.dtype.itemsize and dtype_name(a.dtype.newbyteorder("=")).endswith("float80_x87"):
        u = u.reshape(b.size, -1, 16)[:, :, :10].reshape(b.size, -1)  # skip x87 padding
    return u


def _max_abs(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float | None:
    """Largest |a - b| over the differing elements (NaN-involving pairs skipped); None when the
    dtype is not numeric (strings, times, raw bytes)."""
    name = dtype_name(a.dtype.newbyteorder("="))
    if a.dtype.kind not in "biufc" and not name.startswith(("bfloat", "float", "int", "uint")):
        return None
    wide: Any = np.float64
    if a.dtype.kind == "c":
        wide = np.clongdouble if a.dtype.itemsize > 16 else np.complex128
    elif a.dtype.kind == "f" and a.dtype.itemsize > 8:
        wide = np.longdouble
    x = a.reshape(-1)[mask].astype(wide)
    y = b.reshape(-1)[mask].astype(wide)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(x - y)
    d = d[~np.isnan(d)]
    return float(d.max()) if d.size else float("nan")


def _compare(pa: Path, x: Any, y: Any) -> LeafDiff:
    name = format_path(pa)
    kx, ky = _kind(x), _kind(y)
    if kx != ky:
        return LeafDiff(name, "differs", f"kind {kx} vs {ky}")
    if isinstance(x, (dict, list, tuple)):
        if isinstance(x, dict) and list(x) != list(y) and set(x) == set(y):
            return LeafDiff(name, "differs", "same keys in a different order")
        return LeafDiff(name, "equal")  # children are compared on their own
    if isinstance(x, (np.ndarray, np.generic)):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype != y.dtype or x.shape != y.shape:
            return LeafDiff(name, "differs", f"{_dt(x)}{list(x.shape)} vs {_dt(y)}{list(y.shape)}")
        mask = (_element_bytes(x) != _element_bytes(y)).any(axis=1)
        n = int(mask.sum())
        if n == 0:
            return LeafDiff(name, "equal")
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), x.shape))
        mad = _max_abs(x, y, mask)
        detail = f"{n} of {x.size} elements differ, first at {list(first)}"
        if mad is not None:
            detail += f", max |a-b| = {mad:.6g}"
        return LeafDiff(name, "differs", detail, n, mad, first)
    same = (struct.pack("<d", x) == struct.pack("<d", y)) if isinstance(x, float) else x == y
    if same:
        return LeafDiff(name, "equal")
    ra, rb = repr(x), repr(y)
    return LeafDiff(name, "differs", f"{ra[:60]} vs {rb[:60]}", 1)


def _dt(a: np.ndarray) -> str:
    return dtype_name(a.dtype) + (" (big-endian)" if a.dtype.byteorder == ">" else "")


def diff_trees(a: Any, b: Any) -> list[LeafDiff]:
    """Compare two loaded state trees node by node, bit for bit.

    >>> [d.status for d in diff_trees({"x": 1.0, "y": 2}, {"x": -0.0 + 1.0, "z": 2})]
    ['equal', 'equal', 'missing in B', 'extra in B']
    """
    na, nb = dict(_walk(a)), dict(_walk(b))
    out: list[LeafDiff] = []
    for p, x in na.items():
        if p not in nb:
            if p[:-1] in nb and p[:-1] in na and _kind(na[p[:-1]]) == _kind(nb[p[:-1]]):
                out.append(LeafDiff(format_path(p), "missing in B"))
            continue
        out.append(_compare(p, x, nb[p]))
    for p in nb:
        if p not in na and p[:-1] in na and _kind(na[p[:-1]]) == _kind(nb[p[:-1]]):
            out.append(LeafDiff(format_path(p), "extra in B"))
    return out


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
    diffs = diff_trees(ta, tb)
    bad = [d for d in diffs if d.status != "equal"]
    if as_json:
        typer.echo(json.dumps({"equal": not bad, "a": str(a), "b": str(b),
                               "leaves": [d.to_json() for d in diffs
                                          if show_equal or d.status != "equal"]}, indent=1))
        raise typer.Exit(EXIT_NO if bad else EXIT_OK)
    out = _console()
    shown = diffs if show_equal else bad
    if shown:
        table = Table("path", "status", "detail", show_lines=False)
        style = {"equal": "green", "differs": "red"}
        for d in shown:
            table.add_row(escape(d.path), f"[{style.get(d.status, 'yellow')}]{d.status}[/]",
                          escape(d.detail))
        out.print(table)
    if bad:
        out.print(f"[bold red]DIFFERENT[/]: {len(bad)} of {len(diffs)} nodes differ")
        raise typer.Exit(EXIT_NO)
    out.print(f"[bold green]IDENTICAL[/]: {len(diffs)} nodes bitwise equal")


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
