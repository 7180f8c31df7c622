"""CPU time of each phase of a 10,000-small-array save and load, next to safetensors.

    python benchmarks/phases_cpu.py [--n 10000] [--repeats 15] [--dir /dev/shm]

Wall time on a shared 2-core VM swings by 2x between identical runs; the process CPU time
(``time.process_time``) of the same work swings by a few percent, so it is what this script
reports: best and median of ``--repeats`` per phase, on ``--dir`` (tmpfs by default: the
library's own cost, without the disk).  The state is the one of ``profile_small.py``.
Phases (each timed alone, so they may nest): ``to_tree`` (adapter pass), ``flatten``,
``layout``, ``work_items``, ``write_tree`` (flatten to manifest, data written and synced),
``manifest_bytes``; ``read_manifest`` (decode and validate), ``reader_open`` (that plus the
tree decode), ``tree()`` (batched reads and checksums); ``SAVE`` / ``LOAD`` are whole
``unickpt.save`` / ``unickpt.load`` calls, ``ST SAVE`` / ``ST LOAD`` safetensors' (its save
followed by an fsync of the file and of the directory, as in ``run.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's unickpt wins over an installed one

import numpy as np  # noqa: E402

import unickpt  # noqa: E402
from unickpt.format import manifest as manifest_mod  # noqa: E402
from unickpt.format import reader as reader_mod  # noqa: E402
from unickpt.format import writer as writer_mod  # noqa: E402
from unickpt.state import to_tree  # noqa: E402


def state(n: int) -> dict:
    rng = np.random.default_rng(0)
    out: dict = {}
    for i in range(n):
        out.setdefault(f"g{i // 100:03d}", {})[f"p{i % 100:02d}"] = \
            rng.standard_normal(256).astype(np.float32)
    return out


def cpu(f: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) process CPU time of ``f()`` in ms."""
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        f()
        ts.append(time.process_time() - t0)
    ts.sort()
    return ts[0] * 1e3, ts[len(ts) // 2] * 1e3


def measure(n: int, repeats: int, where: str) -> dict[str, tuple[float, float]]:
    tree = state(n)
    neutral, kinds = to_tree(tree)
    res: dict[str, tuple[float, float]] = {}
    d = tempfile.mkdtemp(prefix=".phases-", dir=where)
    try:
        res["to_tree"] = cpu(lambda: to_tree(tree), repeats)
        res["flatten"] = cpu(lambda: writer_mod.flatten(neutral), repeats)
        node, jobs, sharded = writer_mod.flatten(neutral)
        res["layout"] = cpu(lambda: writer_mod.layout(jobs), repeats)
        header, size = writer_mod.layout(jobs)
        res["work_items"] = cpu(lambda: writer_mod._work_items(jobs), repeats)

        def write() -> None:
            shutil.rmtree(os.path.join(d, "w"), ignore_errors=True)
            os.mkdir(os.path.join(d, "w"))
            writer_mod.write_tree(os.path.join(d, "w"), neutral)

        res["write_tree"] = cpu(write, repeats)
        files = [manifest_mod.FileEntry(writer_mod.DATA_FILE, size, len(header), 0)]
        res["manifest_bytes"] = cpu(lambda: writer_mod._manifest_bytes(
            node, jobs, sharded, files, kinds, None, None), repeats)
        ck = os.path.join(d, "ck")

        def save() -> None:
            shutil.rmtree(ck, ignore_errors=True)
            unickpt.save(ck, tree)

        res["SAVE"] = cpu(save, repeats)
        with open(os.path.join(ck, manifest_mod.MANIFEST_NAME), "rb") as f:
            raw = f.read()
        res["read_manifest"] = cpu(lambda: manifest_mod.read_manifest_bytes(raw, ck), repeats)
        res["reader_open"] = cpu(lambda: reader_mod.CheckpointReader(ck).close(), repeats)
        r = reader_mod.CheckpointReader(ck)
        res["tree()"] = cpu(r.tree, repeats)
        r.close()
        res["LOAD"] = cpu(lambda: unickpt.load(ck), repeats)
        try:
            from safetensors.numpy import load_file, save_file
        except ImportError:
            return res
        flat = {f"{g}/{k}": v for g, sub in tree.items() for k, v in sub.items()}
        st = os.path.join(d, "st.safetensors")

        def st_save() -> None:
            save_file(flat, st)
            for p, flags in ((st, os.O_RDONLY), (d, os.O_RDONLY)):
                fd = os.open(p, flags)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

        res["ST SAVE"] = cpu(st_save, repeats)
        res["ST LOAD"] = cpu(lambda: load_file(st, backend="pread"), repeats)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else ".")
    args = ap.parse_args()
    res = measure(args.n, args.repeats, args.dir)
    print(f"{args.n} arrays of 1 KiB, CPU ms (best / median of {args.repeats}), {args.dir}")
    for k, (best, med) in res.items():
        print(f"  {k:16s} {best:8.1f} {med:8.1f}")
    if "ST SAVE" in res:
        print(f"save {res['ST SAVE'][0] / res['SAVE'][0]:.2f}x safetensors, "
              f"load {res['ST LOAD'][0] / res['LOAD'][0]:.2f}x (best CPU time; > 1: faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
