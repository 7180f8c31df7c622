"""Reference (simple, slow) encoder: the writer's flatten/layout/manifest as before the fast paths.

Kept verbatim so tests can prove the fast writer produces byte-identical headers and manifests.
Not part of unickpt.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from _reference_manifest import (  # noqa: I001
    FORMAT_VERSION,
    MAX_DEPTH,
    ArrayEntry,
    FileEntry,
    Manifest,
    ShardedEntry,
    check_int_range,
    encode_big_int,
)

from unickpt import __version__
from unickpt.errors import UnsupportedLeafError
from unickpt.format import checksum
from unickpt.format.dtypes import UnsupportedDtype, dtype_name, safetensors_code
from unickpt.format.writer import plain_data
from unickpt.tree import LazyArray, Path, ShardedArray, format_path

DATA_FILE = "arrays.safetensors"
HEADER_ALIGN = 64

@dataclass
class _Job:
    path: Path
    array: Any  # np.ndarray, or a zero-arg callable returning one (lazy host copy)
    dtype: np.dtype
    shape: tuple[int, ...]
    scalar: bool
    entry: ArrayEntry | None = None


def flatten(tree: Any) -> tuple[Any, list[_Job], list]:
    """Encode the structure of ``tree`` and collect its arrays, validating every leaf.

    Returns ``(node, jobs, sharded)`` where ``sharded`` holds ``(ShardedArray, [job idx])``.
    """
    return _flatten(tree)


def _flatten(tree: Any) -> tuple[Any, list[_Job], list]:
    jobs: list[_Job] = []
    sharded: list[tuple[ShardedArray, list[int]]] = []
    seen: set[int] = set()

    def add_array(arr: Any, path: Path, scalar: bool = False) -> int:
        a = arr
        dt = a.dtype
        try:
            _dtype_info(dt)
        except UnsupportedDtype as e:
            raise UnsupportedLeafError(f"cannot save {format_path(path)}: {e}") from None
        jobs.append(_Job(path, a, dt, tuple(map(int, a.shape)), scalar))
        return len(jobs) - 1

    def enc(x: Any, path: Path) -> Any:
        if type(x) is np.ndarray:  # the common leaf first: saves ~1 us per array
            return ["a", add_array(x, path)]
        # numpy scalars first: np.float64 / np.str_ / np.bytes_ subclass float / str / bytes,
        # and must come back as the numpy type they are.
        if isinstance(x, np.generic):
            return ["a", add_array(np.asarray(x), path, scalar=True)]
        if x is None or isinstance(x, (bool, bytes)):
            return x
        if isinstance(x, str):
            _check_utf8(x, path)
            return x
        if isinstance(x, int):
            if check_int_range(x):
                return x
            try:
                return encode_big_int(x)
            except ValueError as e:
                raise UnsupportedLeafError(f"cannot save {format_path(path)}: {e}") from None
        if isinstance(x, float):
            return x
        if isinstance(x, np.ndarray):
            return ["a", add_array(x, path)]
        if isinstance(x, LazyArray):
            return ["a", add_array(x, path)]
        if isinstance(x, ShardedArray):
            idx = [add_array(p.data if isinstance(p.data, LazyArray) else np.asarray(p.data),
                             (*path, f"<piece {i}>")) for i, p in enumerate(x.pieces)]
            sharded.append((x, idx))
            return ["s", len(sharded) - 1]
        if isinstance(x, (dict, list, tuple)):
            if len(path) >= MAX_DEPTH:
                raise UnsupportedLeafError(f"cannot save {format_path(path[:8])}/...: the tree "
                                           f"is nested deeper than {MAX_DEPTH} levels")
            if id(x) in seen:
                raise UnsupportedLeafError(f"cannot save {format_path(path)}: the tree "
                                           "contains a reference cycle")
            seen.add(id(x))
            try:
                if isinstance(x, dict):
                    flat: list = []
                    for k, v in x.items():
                        if isinstance(k, bool) or not isinstance(k, (str, int)) or (
                                isinstance(k, int) and not check_int_range(k)):
                            raise UnsupportedLeafError(
                                f"cannot save {format_path(path)}: dict key {k!r} of type "
                                f"{type(k).__name__} (keys must be str or 64-bit int)")
                        if isinstance(k, str):
                            _check_utf8(k, path)
                        flat.append(k)
                        flat.append(enc(v, (*path, k)))
                    return ["d", flat]
                if type(x) not in (list, tuple):
                    raise UnsupportedLeafError(
                        f"cannot save {format_path(path)}: {type(x).__name__} is a "
                        f"{'tuple' if isinstance(x, tuple) else 'list'} subclass; no adapter "
                        "claims it (convert it to a plain tuple/dict, or register an adapter)")
                return ["l" if isinstance(x, list) else "t",
                        [enc(v, (*path, i)) for i, v in enumerate(x)]]
            finally:
                seen.discard(id(x))
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: value of type {type(x).__module__}."
            f"{type(x).__qualname__} is not a state-tree leaf and no adapter claims it. "
            "Use numpy arrays / Python scalars, give the object state_dict()/load_state_dict(), "
            "or install the adapter for its framework")

    return enc(tree, ()), jobs, sharded


def _check_utf8(s: str, path: Path) -> None:
    """Strings are stored as UTF-8: refuse lone surrogates before anything is written."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedLeafError(
            f"cannot save {format_path(path)}: string {s[:40]!r} is not valid Unicode (lone "
            "surrogate); store it as bytes") from None


def _tensor_names(jobs: list[_Job]) -> list[str]:
    names, used = [], {"__metadata__"}  # reserved by safetensors for the header metadata
    for j in jobs:
        base = "/".join(map(str, j.path)) or "<root>"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}#{n}"
        used.add(name)
        names.append(name)
    return names


# Characters json.dumps(ensure_ascii=False) escapes in a string.
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f"\\]').search


@functools.lru_cache(maxsize=1024)
def _dtype_info(dt: np.dtype) -> tuple[str, str, bool, str]:
    """(manifest name, safetensors code, header keeps the shape, byte order) of a dtype."""
    name = dtype_name(dt)
    code = safetensors_code(name)
    return name, code, code != "U8" or name == "uint8", ">" if dt.byteorder == ">" else "<"


def _align(itemsize: int) -> int:
    return min(itemsize & -itemsize, HEADER_ALIGN) if itemsize else HEADER_ALIGN


def layout(jobs: list[_Job], file: str = DATA_FILE) -> tuple[bytes, int]:
    """Assign offsets and build the safetensors header.  Returns ``(header bytes, file size)``.

    Arrays are placed by decreasing alignment so every array starts at a multiple of its own
    alignment (natural alignment for zero-copy memory maps) without gaps, which safetensors
    forbids; the header is padded with spaces so the data section starts 64-byte aligned.
    """
    # One pass per array with per-dtype facts cached: this loop runs once per leaf, so with
    # 10,000 small leaves it is a visible part of a save.
    infos = [_dtype_info(j.dtype) for j in jobs]
    sizes = [math.prod(j.shape) * j.dtype.itemsize for j in jobs]  # stored itemsize is the same
    # By decreasing power-of-two alignment (the lowest set bit of the item size, at most 64):
    # every array's size is a multiple of its own alignment and of all that follow, so each
    # array starts naturally aligned even with odd item sizes such as U3 (12) or V3.
    order = sorted(range(len(jobs)), key=lambda i: -_align(jobs[i].dtype.itemsize))  # stable
    names = _tensor_names(jobs)
    # The header is the JSON that json.dumps(..., ensure_ascii=False, separators=(",", ":"))
    # gives for {"__metadata__": ..., name: {"dtype", "shape", "data_offsets"}, ...}, built
    # with one f-string per array (a dict per array plus json.dumps costs 3x as much).
    parts = [json.dumps({"__metadata__": {"format": "unickpt", "unickpt_format":
                                          str(FORMAT_VERSION)}}, separators=(",", ":"))[:-1]]
    rel = 0
    rel_offsets = [0] * len(jobs)
    for i in order:
        _name, code, keep_shape, _bo = infos[i]
        nbytes = sizes[i]
        name = names[i]
        key = (json.dumps(name, ensure_ascii=False) if _NEEDS_ESCAPE(name)
               else f'"{name}"')
        shape = ",".join(map(str, jobs[i].shape)) if keep_shape else str(nbytes)
        parts.append(f'{key}:{{"dtype":"{code}","shape":[{shape}],'
                     f'"data_offsets":[{rel},{rel + nbytes}]}}')
        rel_offsets[i] = rel
        rel += nbytes
    raw = (",".join(parts) + "}").encode()
    pad = (-(8 + len(raw))) % HEADER_ALIGN
    raw += b" " * pad
    data_start = 8 + len(raw)
    for i, j in enumerate(jobs):
        name, _code, _keep, byteorder = infos[i]
        j.entry = ArrayEntry(file, names[i], name, j.shape, data_start + rel_offsets[i],
                             sizes[i], 0, byteorder, j.scalar)
    return len(raw).to_bytes(8, "little") + raw, data_start + rel


def _manifest_bytes(node: Any, jobs: list[_Job], sharded: list, size: int, header: bytes,
                    kinds: dict[Path, str] | None, metadata: dict | None,
                    info: dict | None) -> bytes:
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        library_version=__version__,
        tree=node,
        arrays=[j.entry for j in jobs],
        sharded=[ShardedEntry(dtype_name(s.dtype), tuple(s.shape),
                              [(tuple(p.index), ji) for p, ji in zip(s.pieces, idx)],
                              ">" if np.dtype(s.dtype).byteorder == ">" else "<")
                 for s, idx in sharded],
        files=[FileEntry(DATA_FILE, size, len(header), checksum.digest(header))],
        kinds=dict(kinds or {}),
        metadata=plain_data(metadata or {}, "metadata"),
        info=plain_data(info or {}, "info"),
    )
    return manifest.to_bytes()
