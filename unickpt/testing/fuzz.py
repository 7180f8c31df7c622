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

import copy
import math
import os
import random
import resource
import shutil
import time
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from ..errors import UnickptError
from ..format import checksum
from ..format.manifest import MANIFEST_NAME

__all__ = ["read_body", "write_body", "KINDS", "ALLOWED_BUILTINS", "CASE_SECONDS",
           "CASE_BYTES", "FuzzReport", "fuzz", "base_state", "default_examples",
           "mutate_body", "mutate_bytes"]

KINDS = ("manifest_structure", "manifest_bytes", "data_bytes")
# Builtin exceptions a reader may raise besides UnickptError subclasses: none.
ALLOWED_BUILTINS: tuple[type[BaseException], ...] = ()
CASE_SECONDS = 1.0  # CPU seconds per operation on one mutated checkpoint
CASE_BYTES = 100 << 20  # extra memory (traced allocations) per operation


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


def default_examples(fallback: int) -> int:
    """``UNICKPT_FUZZ_EXAMPLES`` or ``fallback``: how many mutated checkpoints per kind."""
    v = os.environ.get("UNICKPT_FUZZ_EXAMPLES", "").strip()
    return int(v) if v.isdigit() else fallback


def base_state() -> dict:
    """A small state with every kind of leaf the format stores (the fuzzing seed)."""
    import ml_dtypes

    from ..tree import Piece, ShardedArray
    a = np.arange(8.0).reshape(2, 4)
    return {
        "w": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4),
        "i": np.arange(-5, 5, dtype=np.int64), "b": np.array([True, False]),
        "bf": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16),
        "u": np.array(["ab", "c"]), "z": np.float64(2.5), "e": np.zeros((0, 3), np.int16),
        "big": np.arange(3, dtype=">u4"),
        "s": ShardedArray((2, 4), a.dtype, [Piece(((0, 2), (0, 2)), a[:, :2].copy()),
                                            Piece(((0, 2), (2, 4)), a[:, 2:].copy())]),
        "py": [1, -(2**70), 1.5, float("nan"), "t\u00e9xt", b"\x00b", None, True],
        "nest": {"a/b": {"": [[], {}]}},
    }


# ------------------------------------------------------------------ mutations
_INTS = [0, 1, -1, 2, 7, 255, 2**31, 2**32, 2**53 + 1, 2**61, 2**62, 2**63 - 1, -(2**63),
         2**64 - 1, -(2**31)]
_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -0.0, 0.5]
_STRS = ["", "a", "w", "arrays.safetensors", "../../etc/passwd", "/abs", "x" * 5000, "\x00",
         "a/b", "U1000000000", "<U2147483647", "S0", "V16", "O", "object", "float32", "<f4",
         ">f8", "bfloat16", "float8_e4m3fn", "int4", "|b1", "complex128", "M8[ns]", "m8",
         "d", "l", "t", "a", "s", "i", "f", "xxh3_64", "md5"]
_BYTES = [b"", b"\x00" * 8, b"\xff" * 64]


def _deep(n: int) -> Any:
    x: Any = 0
    for _ in range(n):
        x = [x]
    return x


def _palette(rng: random.Random) -> Any:
    pick = rng.randrange(10)
    if pick < 3:
        return rng.choice(_INTS)
    if pick < 4:
        return rng.choice(_FLOATS)
    if pick < 6:
        return rng.choice(_STRS)
    if pick < 7:
        return rng.choice(_BYTES + [None, True, False])
    if pick < 8:
        return rng.choice([[], [0], [-1], [0, 2**61], [2**32] * 64, [1] * 65, [[0, 1]] * 3,
                           [[0, 2], [0, 2]], _deep(rng.choice([50, 300, 3000]))])
    if pick < 9:
        return rng.choice([{}, {"a": 1}, {1: 2}, {"array": 0, "index": []}])
    return [["a", 0]] * rng.choice([2, 1000])


def _nodes(x: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _nodes(v, (*path, i))


def _get(x: Any, path: tuple) -> Any:
    for k in path:
        x = x[k]
    return x


def _mutate_packed(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One change inside a packed column of the v3 array table (msgpack ``bin``): a flipped
    bit, an index byte set, a value of the 8-byte columns replaced, the column cut or
    extended (by one item or by a byte: a length no item size divides)."""
    b = bytearray(raw)
    op = rng.randrange(5)
    if op == 0 and b:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"flip bit at {i}"
    if op == 1 and b:
        i = rng.randrange(len(b))
        b[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        return bytes(b), f"set byte {i}"
    if op == 2 and len(b) >= 8:
        i = 8 * rng.randrange(len(b) // 8)
        v = rng.choice(_INTS + [len(b), 64, 1 << 40]) % (1 << 64)
        b[i:i + 8] = v.to_bytes(8, "little")
        return bytes(b), f"item at {i} = {v}"
    if op == 3:
        cut = rng.choice([1, 8, len(b)])
        return bytes(b[:max(0, len(b) - cut)]), f"cut {cut} bytes"
    more = rng.choice([1, 2, 8])
    return bytes(b) + bytes([rng.choice([0, 0xFF])]) * more, f"extend by {more} bytes"


def mutate_body(body: dict, rng: random.Random) -> tuple[dict, str]:
    """One structure-aware mutation of a manifest body (a deep copy); and what it did.

    In a v3 body a third of the mutations go to the array table (``arrays``, a map of
    columns), and a packed column (``bin``) is changed inside (:func:`_mutate_packed`) as
    often as replaced: a random value there would mostly fail the length check alone.
    """
    body = copy.deepcopy(body)
    paths = [p for p in _nodes(body) if p]
    if isinstance(body.get("arrays"), dict) and rng.randrange(3) == 0:
        paths = [p for p in paths if p[0] == "arrays"] or paths
    path = rng.choice(paths)
    parent, key = _get(body, path[:-1]), path[-1]
    if isinstance(parent[key], bytes) and rng.randrange(2) == 0:
        parent[key], what = _mutate_packed(parent[key], rng)
        return body, f"packed {path}: {what}"
    op = rng.randrange(7)
    if op == 0 and isinstance(parent, dict):
        del parent[key]
        return body, f"delete {path}"
    if op == 1:
        other = _get(body, rng.choice(paths))
        parent[key] = copy.deepcopy(other)
        return body, f"{path} = another node"
    if op == 2 and isinstance(parent[key], bool) is False and isinstance(parent[key], int):
        parent[key] += rng.choice([-1, 1, 8, -8, 1 << 20])
        return body, f"{path} nudged"
    if op == 3 and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
        return body, f"duplicate {path}"
    if op == 4:
        parent[key] = [parent[key]]
        return body, f"wrap {path}"
    value = _palette(rng)
    parent[key] = value
    try:
        shown = repr(value)[:40]
    except RecursionError:
        shown = "<deeply nested list>"
    return body, f"{path} = {shown}"


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One byte-level mutation (bit flip, byte set, cut, extension, zeroed range)."""
    b = bytearray(data)
    op = rng.randrange(5)
    i = rng.randrange(max(1, len(b)))
    if op == 0 and b:
        b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"flip bit at {i}"
    if op == 1 and b:
        b[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        return bytes(b), f"set byte {i}"
    if op == 2:
        return bytes(b[:i]), f"truncate to {i}"
    if op == 3:
        return bytes(b) + bytes(rng.randrange(1, 64)), "extend"
    n = rng.randrange(1, 64)
    b[i:i + n] = bytes(len(b[i:i + n]))
    return bytes(b), f"zero {n} bytes at {i}"


# ------------------------------------------------------------------ running
@dataclass
class FuzzReport:
    """Counts of cases by kind, outcomes by operation (``"ok"`` or the error's type name),
    slowest case, and the failures (escaped exceptions, slow/huge cases, wrong data)."""

    cases: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    max_seconds: float = 0.0
    max_bytes: int = 0
    failures: list[str] = field(default_factory=list)

    def count(self, key: str) -> None:
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


def _same(a: Any, b: Any) -> bool:
    from .compare import diff_trees
    try:
        return not diff_trees(a, b)
    except Exception:  # noqa: BLE001 - incomparable counts as different
        return False


def _ops(ckpt: str, restore: bool, target: Any) -> dict[str, Callable[[], Any]]:
    from .. import load, verify
    from ..manager import CheckpointManager

    def restored() -> Any:
        with CheckpointManager(os.path.dirname(ckpt), resume="auto") as m:
            return m.restore(target).state

    ops = {"verify": lambda: verify(ckpt, raise_on_error=False).ok,
           "load": lambda: load(ckpt), "load_mmap": lambda: load(ckpt, mmap=True)}
    if restore:
        ops["restore"] = restored
    return ops


def _run_case(ckpt: str, where: str, rep: FuzzReport, original: Any, *,
              restore: bool, data_exact: bool) -> None:
    results: dict[str, Any] = {}
    for name, fn in _ops(ckpt, restore, base_state()).items():
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        t0 = time.process_time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[name] = fn()
            rep.count(f"{name}:ok")
        except (UnickptError, *ALLOWED_BUILTINS) as e:  # type: ignore[misc]
            rep.count(f"{name}:{type(e).__name__}")
        except Exception as e:  # noqa: BLE001 - the finding
            rep.failures.append(f"{where}: {name} raised {type(e).__name__}: {e}"[:400])
        dt = time.process_time() - t0
        used = tracemalloc.get_traced_memory()[1] - before
        rep.max_seconds, rep.max_bytes = max(rep.max_seconds, dt), max(rep.max_bytes, used)
        if dt > CASE_SECONDS:
            rep.failures.append(f"{where}: {name} took {dt:.2f} CPU s")
        if used > CASE_BYTES:
            rep.failures.append(f"{where}: {name} used {used >> 20} MiB")
    if results.get("verify") is True:
        # verify says ok: both readers must work and agree; for byte-level damage (the
        # checksums were not recomputed) they must also give back what was saved
        for name in ("load", "load_mmap"):
            if name not in results:
                rep.failures.append(f"{where}: verify ok but {name} failed")
        if "load" in results and "load_mmap" in results and \
                not _same(results["load"], results["load_mmap"]):
            rep.failures.append(f"{where}: verify ok but load and load(mmap) differ")
        if data_exact and "load" in results and not _same(results["load"], original):
            rep.failures.append(f"{where}: verify ok but load returned different data")


def fuzz(workdir: str, *, examples: int, seed: int = 0,
         kinds: tuple[str, ...] = KINDS, restore_every: int = 4) -> FuzzReport:
    """Mutate a checkpoint ``examples`` times per kind and check the reader contract.

    >>> import tempfile
    >>> rep = fuzz(tempfile.mkdtemp(), examples=3)
    >>> sorted(rep.cases.items()), rep.failures
    ([('data_bytes', 3), ('manifest_bytes', 3), ('manifest_structure', 3)], [])
    """
    from .. import load, save
    rng = random.Random(seed)
    rep = FuzzReport()
    pristine = os.path.join(workdir, "pristine", "step_1")
    save(pristine, base_state())
    original = load(pristine)
    body = read_body(pristine)
    names = sorted(os.listdir(pristine))
    data_name = next(n for n in names if n != MANIFEST_NAME)
    raw = {}
    for n in names:
        with open(os.path.join(pristine, n), "rb") as f:
            raw[n] = f.read()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        for kind in kinds:
            for i in range(examples):
                root = os.path.join(workdir, f"{kind}-{i}")
                ckpt = os.path.join(root, "step_1")
                shutil.copytree(pristine, ckpt)
                if kind == "manifest_structure":
                    mutated, what = mutate_body(body, rng)
                    try:
                        write_body(ckpt, mutated)
                    except (ValueError, TypeError, OverflowError):  # msgpack cannot pack it
                        write_body(ckpt, body)
                        what += " (unpackable, skipped)"
                else:
                    name = MANIFEST_NAME if kind == "manifest_bytes" else data_name
                    data, what = mutate_bytes(raw[name], rng)
                    with open(os.path.join(ckpt, name), "wb") as f:
                        f.write(data)
                rep.cases[kind] = rep.cases.get(kind, 0) + 1
                _run_case(ckpt, f"{kind} #{i} ({what})", rep, original,
                          restore=i % restore_every == 0,
                          data_exact=kind != "manifest_structure")
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if started:
            tracemalloc.stop()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    if grown > CASE_BYTES:
        rep.failures.append(f"peak resident memory grew by {grown >> 20} MiB during fuzzing")
    return rep
