"""Fuzzing checkpoints: structure-aware manifest mutations (with a valid outer checksum) and
byte-level mutations of both files, checked against the reader's contract.

The contract (docs/testing.md): for any bytes on disk, ``unickpt.load`` (plain and mmap),
``unickpt.verify`` and ``CheckpointManager.restore`` either succeed or raise a
:class:`~unickpt.UnickptError` (or one of :data:`ALLOWED_BUILTINS`), within
:data:`CASE_SECONDS` and :data:`CASE_BYTES` of extra memory; and nothing loads data that
differs from what was saved while ``verify`` says ok.

>>> import tempfile, numpy as np, unickpt
>>> p = tempfile.mkdtemp() + "/ck"
>>> _ = unickpt.save(p, {"w": np.arange(3.0)})
>>> body = read_body(p)
>>> body["info"] = {"metrics": [1, 2]}
>>> write_body(p, body)
>>> unickpt.load(p)["w"].tolist()
[0.0, 1.0, 2.0]
"""

from __future__ import annotations

import os
from typing import Any

import msgpack

from ..format import checksum
from ..format.manifest import MANIFEST_NAME

__all__ = ["read_body", "write_body"]


def _manifest_path(ckpt: str | os.PathLike) -> str:
    return os.path.join(os.fspath(ckpt), MANIFEST_NAME)


def read_body(ckpt: str | os.PathLike) -> dict:
    """The decoded manifest body of checkpoint ``ckpt`` (for mutating it)."""
    with open(_manifest_path(ckpt), "rb") as f:
        outer = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
    return msgpack.unpackb(outer["body"], raw=False, strict_map_key=False)


def write_body(ckpt: str | os.PathLike, body: Any, *, version: Any = None) -> None:
    """Write ``body`` as the manifest of ``ckpt`` with a *valid* outer checksum, so that a
    mutation reaches the validation behind the checksum."""
    raw = msgpack.packb(body, use_bin_type=True, strict_types=False)
    if version is None:
        version = body.get("format_version", 2) if isinstance(body, dict) else 2
    data = msgpack.packb({"unickpt": version, "xxh3": checksum.digest(raw), "body": raw},
                         use_bin_type=True)
    with open(_manifest_path(ckpt), "wb") as f:
        f.write(data)
