"""How a crowded Python heap slows the load of many small arrays (unickpt and safetensors).

    python benchmarks/heap_effect.py [--repeats 9] [--dir /dev/shm]

Saves (durably) and loads the ``small`` state of ``run.py`` (10,000 arrays, 4 B - 1 KiB) with
unickpt and safetensors, in one process, three times: fresh; after
200,000 small containers were made in shuffled order and kept (a heap like a training
process's); and after orbax saved and restored the same state once (what the full
``run.py`` process holds when the small state's turn comes), when orbax is installed.  Each
figure is the best CPU time (``time.process_time``) of ``--repeats``, also with the garbage
collector off, which shows whether collections or allocation itself pay for the heap.  The
msgpack decode of the manifest is timed apart: with format version 2's map per array entry it
made about a dozen Python objects per array; version 3's columnar table makes a few dozen in
all, plus the names.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # this checkout's unickpt wins over an installed one

import _states  # noqa: E402
import msgpack  # noqa: E402


def _best(fn: Callable[[], object], repeats: int) -> float:
    """Best CPU time of ``repeats`` calls; a save returns the path it wrote, which is
    removed after the clock stops (so the next save writes a new checkpoint)."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
        if isinstance(out, str):
            shutil.rmtree(out) if os.path.isdir(out) else os.remove(out)
    return min(times)


def _manifest_body(path: str) -> bytes:
    """The msgpack body of a unickpt manifest (after its fixed-size preamble)."""
    with open(os.path.join(path, "manifest.msgpack"), "rb") as f:
        raw = f.read()
    for off in range(min(len(raw), 256)):  # the preamble's length is the format's business
        try:
            doc = msgpack.unpackb(raw[off:], raw=False, strict_map_key=False)
        except Exception:  # noqa: BLE001 - not the body's start yet
            continue
        if isinstance(doc, dict) and "arrays" in doc:
            return raw[off:]
    raise ValueError(f"{path}: no manifest body found")


def measure(workdir: str, repeats: int, log: Callable[[str], None] = print) -> list[dict]:
    from _systems import fsync_tree
    from safetensors.numpy import load_file, save_file

    import unickpt

    tree = _states.small()
    u, s = os.path.join(workdir, "u"), os.path.join(workdir, "s.safetensors")
    unickpt.save(u, tree)
    save_file(_states.flatten(tree), s)
    body = _manifest_body(u)
    flat = _states.flatten(tree)

    def u_save() -> str:
        p = os.path.join(workdir, "u-save")
        unickpt.save(p, tree)
        return p

    def s_save() -> str:  # durable like unickpt's: the file and its directory synced
        p = os.path.join(workdir, "s-save.safetensors")
        save_file(flat, p)
        fsync_tree(p)
        return p

    cases: list[tuple[str, Callable[[], object]]] = [
        ("unickpt.save", u_save),
        ("safetensors save_file", s_save),
        ("unickpt.load", lambda: unickpt.load(u)),
        ("safetensors load_file", lambda: load_file(s, backend="pread")),
        ("manifest msgpack decode", lambda: msgpack.unpackb(body, raw=False,
                                                            strict_map_key=False))]
    rows: list[dict] = []
    keep: list = []

    def run(heap: str) -> None:
        row: dict = {"heap": heap, "objects": len(gc.get_objects())}
        for name, fn in cases:
            row[name] = _best(fn, repeats)
            was = gc.isenabled()
            gc.disable()
            try:
                row[name + " (gc off)"] = _best(fn, repeats)
            finally:
                if was:
                    gc.enable()
        rows.append(row)
        log(f"{heap:40s} objects {row['objects']:>8,}  " + "  ".join(
            f"{n} {row[n] * 1e3:6.1f} ms" for n, _ in cases))

    run("fresh")
    made = [{"i": i, "v": [i]} for i in range(400_000)]
    random.Random(0).shuffle(made)
    keep.append(made[:200_000])  # half freed, in shuffled order: holes all over the heap
    del made
    run("200,000 containers kept")
    keep.clear()
    gc.collect()
    try:
        import orbax.checkpoint as ocp
    except ImportError:
        log("orbax not installed: its case is left out")
        return rows
    ckptr = ocp.StandardCheckpointer()
    o = os.path.join(workdir, "orbax")
    ckptr.save(o, tree)
    ckptr.wait_until_finished()
    restored = ckptr.restore(o)
    del restored
    gc.collect()
    run("after one orbax save + restore")
    return rows


def markdown(rows: list[dict]) -> str:
    names = [k for k in rows[0] if k not in ("heap", "objects")]
    lines = ["| heap | live objects | " + " | ".join(names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for r in rows:
        lines.append(f"| {r['heap']} | {r['objects']:,} | "
                     + " | ".join(f"{r[n] * 1e3:.1f} ms" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the checkpoints go (default: tmpfs, so the disk adds nothing)")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix=".heap-", dir=args.dir)
    try:
        rows = measure(work, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
