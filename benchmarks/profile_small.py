"""Where the time of a 10,000-small-array checkpoint goes: unickpt vs safetensors, same run.

    python benchmarks/profile_small.py [--n 10000] [--repeats 7] [--dir PATH] [--top 25]

The state is ``--n`` float32 arrays of 1 KiB (256 elements) in groups of 100.  Both systems
save durably (safetensors gets an fsync of its file and of the directory, as in ``run.py``) and
restore into memory (safetensors with ``backend="pread"``); unickpt verifies its checksums.
Prints, for each system and operation: best and median wall time (alternating, no profiler),
the number of fsync / mkdir / rename calls and their total time (counted by wrapping the ``os``
functions), and the top of a cProfile run by own time and by cumulative time.  The findings
are written up in ``PROFILE_small_arrays.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # this checkout's unickpt wins over an installed one

import numpy as np  # noqa: E402
from _systems import fsync_tree  # noqa: E402

import unickpt  # noqa: E402


def state(n: int) -> dict:
    rng = np.random.default_rng(0)
    out: dict = {}
    for i in range(n):
        out.setdefault(f"g{i // 100:03d}", {})[f"p{i % 100:02d}"] = \
            rng.standard_normal(256).astype(np.float32)
    return out


def flat(tree: dict) -> dict[str, np.ndarray]:
    return {f"{g}/{k}": v for g, sub in tree.items() for k, v in sub.items()}


class Syscalls:
    """Counts and times os.fsync / os.mkdir / os.rename / os.replace while active."""

    NAMES = ("fsync", "mkdir", "rename", "replace", "open")

    def __init__(self) -> None:
        self.count = dict.fromkeys(self.NAMES, 0)
        self.secs = dict.fromkeys(self.NAMES, 0.0)
        self._orig: dict[str, Callable] = {}

    def __enter__(self) -> Syscalls:
        for n in self.NAMES:
            orig = self._orig[n] = getattr(os, n)

            def wrap(*a: Any, _n: str = n, _f: Callable = orig, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    self.count[_n] += 1
                    self.secs[_n] += time.perf_counter() - t0

            setattr(os, n, wrap)
        return self

    def __exit__(self, *exc: object) -> None:
        for n, f in self._orig.items():
            setattr(os, n, f)


# Coarse phases of a save and a load, timed by wrapping the functions by name (a dozen calls
# per checkpoint, so the wrappers cost nothing measurable, unlike cProfile's per-call hooks).
# Names that a refactoring removed are skipped, so the script keeps working as the code moves.
PHASES = [
    ("save", "unickpt.api", "to_tree", "adapter pass: state -> neutral tree (per-array walk)"),
    ("save", "unickpt.format.commit", "flatten", "flatten + validate every leaf (per-array walk)"),
    ("save", "unickpt.format.writer", "layout", "offsets + safetensors header (per array)"),
    ("save", "unickpt.format.writer", "_work_items", "write batching plan"),
    ("save", "unickpt.format.writer", "_manifest_bytes", "manifest entries + msgpack (per array)"),
    ("save", "unickpt.format.commit", "write_tree", "everything inside the temp dir"),
    ("save", "unickpt.format.commit", "staged", "temp dir mkdir (enter) / cleanup (exit)"),
    ("save", "unickpt.storage.LocalStorage", "commit", "rename + parent/dir fsyncs"),
    ("load", "unickpt.format.reader", "read_manifest_bytes", "manifest decode + validation"),
    ("load", "unickpt.format.manifest", "_validate", "validation (part of the above)"),
    ("load", "unickpt.format.manifest", "fast_table",
     "column validation of the array entries (part of the above)"),
    ("load", "unickpt.format.reader", "decode_node", "tree decode"),
    ("load", "unickpt.format.reader.CheckpointReader", "_small_batches", "batch plan"),
    ("load", "unickpt.format.reader.CheckpointReader", "_read_batch",
     "preadv + checksums + views (per batch)"),
]


def _resolve(dotted: str) -> Any:
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(dotted)


class Phases:
    """Accumulated seconds per wrapped phase while active (os.fsync / os.mkdir counted too)."""

    def __init__(self) -> None:
        self.secs: dict[str, float] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def _wrap(self, owner: Any, attr: str, label: str) -> None:
        orig = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        if isinstance(orig, (staticmethod, classmethod)):
            return
        import contextlib

        if label.startswith("temp dir"):  # a context manager: time enter and exit
            @contextlib.contextmanager
            def cm(*a: Any, **k: Any) -> Any:
                t0 = time.perf_counter()
                with orig(*a, **k) as v:
                    self.secs[label] = self.secs.get(label, 0.0) + time.perf_counter() - t0
                    yield v
                    t0 = time.perf_counter()
                self.secs[label] += time.perf_counter() - t0
            new: Any = cm
        else:
            def new(*a: Any, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return orig(*a, **k)
                finally:
                    self.secs[label] = self.secs.get(label, 0.0) + time.perf_counter() - t0
        setattr(owner, attr, new)
        self._undo.append((owner, attr, orig))

    def __enter__(self) -> Phases:
        for _op, mod, attr, label in PHASES:
            try:
                owner = _resolve(mod)
                if attr in getattr(owner, "__dict__", {}):
                    self._wrap(owner, attr, f"{attr}: {label}")
            except (ImportError, AttributeError):
                pass
        self._wrap(os, "fsync", "os.fsync (all)")
        self._wrap(os, "mkdir", "os.mkdir (all)")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, orig in reversed(self._undo):
            setattr(owner, attr, orig)


def phases(save: Callable[[str], Any], load: Callable[[str], Any], path: Callable[[], str],
           repeats: int) -> None:
    """Best-of-N time per phase of unickpt's save and load (each phase's own best)."""
    best: dict[str, dict[str, float]] = {"save": {}, "load": {}}
    for _ in range(repeats):
        p = path()
        for op, fn in (("save", save), ("load", load)):
            with Phases() as ph:
                t0 = time.perf_counter()
                fn(p)
                ph.secs["TOTAL"] = time.perf_counter() - t0
            for k, v in ph.secs.items():
                best[op][k] = min(best[op].get(k, v), v)
    for op in ("save", "load"):
        print(f"\nunickpt {op} phases (best of {repeats} each, phases may nest):")
        for k, v in sorted(best[op].items(), key=lambda kv: -kv[1]):
            print(f"  {v * 1e3:7.1f} ms  {k}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir in .)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    from safetensors.numpy import load_file, save_file

    tree = state(args.n)
    fl = flat(tree)
    work = os.path.abspath(tempfile.mkdtemp(prefix=".profile-", dir=args.dir or "."))
    k = [0]

    def path(ext: str = "") -> str:
        k[0] += 1
        return os.path.join(work, f"c{k[0]}{ext}")

    def st_save(p: str) -> None:
        save_file(fl, p)
        fsync_tree(p)

    ops: dict[str, tuple[Callable[[str], Any], Callable[[str], Any], str]] = {
        "unickpt": (lambda p: unickpt.save(p, tree), unickpt.load, ""),
        "safetensors": (st_save, lambda p: load_file(p, backend="pread"), ".safetensors"),
    }
    times: dict[str, list[float]] = {f"{s} {o}": [] for s in ops for o in ("save", "load")}
    try:
        for rep in range(args.repeats + 1):  # the first round warms up, untimed
            for sname, (save, load, ext) in ops.items():
                p = path(ext)
                t0 = time.perf_counter()
                save(p)
                t1 = time.perf_counter()
                load(p)
                t2 = time.perf_counter()
                if rep:
                    times[f"{sname} save"].append(t1 - t0)
                    times[f"{sname} load"].append(t2 - t1)
        print(f"{args.n} arrays of 1 KiB, durable saves, {args.repeats} alternating repeats, "
              f"{work} ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f})\n")
        for key, ts in times.items():
            print(f"{key:18s} best {min(ts) * 1e3:7.1f} ms  median "
                  f"{statistics.median(ts) * 1e3:7.1f} ms")
        phases(ops["unickpt"][0], ops["unickpt"][1], path, args.repeats)
        for sname, (save, load, ext) in ops.items():
            p = path(ext)
            for oname, fn in (("save", save), ("load", load)):
                with Syscalls() as sc:
                    t0 = time.perf_counter()
                    fn(p)
                    dt = time.perf_counter() - t0
                print(f"\n{sname} {oname}: {dt * 1e3:.1f} ms wall; " + ", ".join(
                    f"{n} x{sc.count[n]} {sc.secs[n] * 1e3:.1f} ms" for n in sc.NAMES
                    if sc.count[n]))
            p = path(ext)
            for oname, fn in (("save", save), ("load", load)):
                prof = cProfile.Profile()
                prof.enable()
                fn(p)
                prof.disable()
                for sort in ("tottime", "cumulative"):
                    s = io.StringIO()
                    pstats.Stats(prof, stream=s).strip_dirs().sort_stats(sort).print_stats(
                        args.top)
                    body = s.getvalue()
                    print(f"\n--- cProfile {sname} {oname} by {sort} ---")
                    print(body[body.find("   ncalls"):].rstrip())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
