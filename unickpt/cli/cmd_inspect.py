"""``unickpt inspect CKPT``: the tree (dtypes, shapes, sizes, scalar values), metadata, info,
and the files as they are on disk next to what the manifest says they should be."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ._output import error, human_size, jsonable
from .exit_codes import ExitCode

NAME = "inspect"
HELP = "show a checkpoint's tree, metadata, info and its files' sizes on disk"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint directory")
    p.add_argument("--json", dest="as_json", action="store_true",
                   help="print the summary as JSON")


class _Ref:
    """A placeholder for an array leaf while the manifest tree is decoded without data."""

    def __init__(self, kind: str, dtype: str, shape: tuple[int, ...], nbytes: int):
        self.kind, self.dtype, self.shape, self.nbytes = kind, dtype, shape, nbytes

    def label(self) -> str:
        from rich.markup import escape

        tag = " [magenta]sharded[/]" if self.kind == "sharded" else ""
        return (f"[cyan]{escape(self.dtype)}[/]{escape(str(list(self.shape)))} "
                f"[dim]{human_size(self.nbytes)}[/]{tag}")


def _skeleton(r: Any) -> Any:
    m = r.manifest

    def arr(i: int, _p: Any) -> _Ref:
        e = m.arrays[i]
        return _Ref("array", e.dtype, e.shape, e.nbytes)

    def sharded(i: int, _p: Any) -> _Ref:
        s = m.sharded[i]
        return _Ref("sharded", s.dtype, s.shape, sum(m.arrays[a].nbytes for _, a in s.pieces))

    return r.map_tree(arr, sharded)


def disk_files(path: str, manifest: Any, storage: Any = None) -> list[dict[str, Any]]:
    """Each file of the checkpoint: its size on disk (None: missing) and the manifest's claim
    (None for the manifest itself, which carries no claim about its own size)."""
    from ..format.manifest import MANIFEST_NAME

    rows = [(MANIFEST_NAME, None)] + [(f.name, f.size) for f in manifest.files]
    out = []
    for name, claim in rows:
        try:
            if storage is not None:  # a URL: the object's size (closed at once)
                fh = storage.open(os.path.join(path, name))
                disk: int | None = fh.size
                fh.close()
            else:
                disk = os.stat(os.path.join(path, name)).st_size
        except OSError:
            disk = None
        out.append({"name": name, "disk_bytes": disk, "manifest_bytes": claim,
                    "ok": disk is not None and (claim is None or disk == claim)})
    return out


def _file_line(f: dict[str, Any]) -> str:
    if f["disk_bytes"] is None:
        return f"  {f['name']}: MISSING (the manifest says {human_size(f['manifest_bytes'])})"
    line = f"  {f['name']}: {human_size(f['disk_bytes'])} on disk"
    if not f["ok"]:
        what = "TRUNCATED" if f["disk_bytes"] < f["manifest_bytes"] else "TOO LONG"
        line += (f", {what}: the manifest says {f['manifest_bytes']} bytes, the file has "
                 f"{f['disk_bytes']}")
    return line


def _add_nodes(node: Any, x: Any) -> None:
    from ..tree import format_path

    for k, v in (x.items() if isinstance(x, dict) else enumerate(x)):
        _add_node(node, format_path((k,)), v)


def _add_node(node: Any, key: str, v: Any) -> None:
    from rich.markup import escape

    if isinstance(v, (dict, list, tuple)):
        kind = {dict: "dict", list: "list", tuple: "tuple"}[type(v)]
        _add_nodes(node.add(f"[bold]{escape(key)}[/] [dim]{kind}({len(v)})[/]"), v)
    elif isinstance(v, _Ref):
        node.add(f"[bold]{escape(key)}[/]: {v.label()}")
    else:
        text = repr(v)
        text = text if len(text) <= 80 else text[:77] + "..."
        node.add(f"[bold]{escape(key)}[/]: [green]{type(v).__name__}[/] = {escape(text)}")


def _json(summary: Any, files: list[dict[str, Any]]) -> str:
    return json.dumps({
        "path": summary.path, "format_version": summary.format_version,
        "library_version": summary.library_version, "total_bytes": summary.total_bytes,
        "file_bytes": summary.file_bytes,
        "disk_bytes": sum(f["disk_bytes"] or 0 for f in files), "files": files,
        "leaves": [{"path": lf.path, "kind": lf.kind, "dtype": lf.dtype,
                    "shape": list(lf.shape) if lf.shape is not None else None,
                    "nbytes": lf.nbytes, "value": jsonable(lf.value)}
                   for lf in summary.leaves],
        "metadata": jsonable(summary.metadata), "info": jsonable(summary.info),
        "kinds": summary.kinds,
    }, ensure_ascii=False, indent=1)


def run(args: argparse.Namespace) -> ExitCode:
    from ..api import inspect as _inspect
    from ..errors import UnickptError
    from ..format.reader import CheckpointReader

    try:
        summary = _inspect(args.ckpt)
        with CheckpointReader(args.ckpt) as r:
            skeleton = _skeleton(r)
            files = disk_files(r.path, r.manifest, r.storage)
    except (UnickptError, OSError) as e:
        return ExitCode(error(NAME, e, ExitCode.UNREADABLE))
    if args.as_json:
        print(_json(summary, files))
        return ExitCode.OK
    _print(summary, skeleton, files)
    return ExitCode.OK


def _print(summary: Any, skeleton: Any, files: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.tree import Tree

    out = Console(highlight=False, soft_wrap=True)
    narrays = sum(1 for lf in summary.leaves if lf.kind in ("array", "sharded"))
    disk = sum(f["disk_bytes"] or 0 for f in files)
    out.print(f"[bold]{escape(summary.path)}[/]")
    out.print(f"format v{summary.format_version} · written by unickpt "
              f"{escape(summary.library_version)} · {len(summary.leaves)} leaves "
              f"({narrays} array leaves, {human_size(summary.total_bytes)} of array data, "
              f"{human_size(disk)} in files on disk)")
    root = Tree("[bold]tree[/]")
    if isinstance(skeleton, (dict, list, tuple)):
        _add_nodes(root, skeleton)
    else:
        _add_node(root, "<root>", skeleton)
    out.print(root)
    out.print("[bold]files[/]")
    for f in files:
        out.print(escape(_file_line(f)))
    if not all(f["ok"] for f in files):
        out.print("[bold red]damaged:[/] a file differs from the manifest; run "
                  "`unickpt verify` to see which arrays are intact")
    for title, d in (("kinds", summary.kinds), ("metadata", summary.metadata),
                     ("info", summary.info)):
        if d:
            out.print(f"[bold]{title}[/]")
            for k, v in d.items():
                out.print(f"  {escape(str(k))}: {escape(repr(v))}")
