"""Incremental checkpoints: bytes written and save time with sharing vs full saves.

    python benchmarks/incremental_bench.py [--mib 512] [--saves 10] [--repeats 3] [--out DIR]

Two states of ``--mib`` MiB, each saved ``--saves`` times by a ``CheckpointManager``
(``keep_last=2``, so the disk holds what a run would), once with ``incremental=True`` (the
default) and once with ``incremental=False`` (every byte written, one array file: what a save
cost before sharing existed):

* ``frozen95``: 95% of the bytes frozen (a LoRA-style fine-tune: 38 frozen 12.8 MiB weights,
  trained adapters and their Adam moments making up the other 5%, changed at every save);
* ``allchange``: the same layout, every array changed at every save (the worst case for
  sharing: it finds nothing to share and must cost no more than a full save).

Reported per state: the total array bytes written by saves 2..N (from each checkpoint's
``info["written_bytes"]``, and checked against the bytes of the new files on disk), the
total time of saves 2..N (median over ``--repeats`` runs, configurations alternating so that
background load hits them alike), and the ratios.  Targets (issue 17): for ``frozen95``
>= 10x fewer bytes and >= 5x less time; for ``allchange`` <= 5% slower.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import unickpt  # noqa: E402
from unickpt.manager import RunRoot  # noqa: E402


def make_state(mib: int, step: int, frozen_share: float) -> dict:
    """``mib`` MiB: frozen weights (bytes fixed by index) and trained arrays (fixed by step);
    with ``frozen_share=0`` the "frozen" weights change too."""
    total = mib << 20
    nfrozen = 38
    frozen_each = int(total * 0.95) // nfrozen // 4
    trained_each = int(total * 0.05) // 3 // 4
    fstep = 0 if frozen_share > 0 else step
    base = np.arange(max(frozen_each, trained_each), dtype=np.uint32) * np.uint32(2654435761)
    frozen = {f"layer{i}": (base[:frozen_each] ^ np.uint32(i * 131 + fstep * 7919))
              .view(np.float32) for i in range(nfrozen)}
    t = base[:trained_each] ^ np.uint32(step * 104729 + 1)
    return {"model": frozen,
            "adapter": {"lora": t.view(np.float32), "mu": (t + 1).view(np.float32),
                        "nu": (t + 2).view(np.float32)},
            "step": step}


def one_run(mib: int, saves: int, frozen_share: float, incremental: bool) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="unickpt-incr-bench-", dir=os.environ.get("TMPDIR"))
    states = [make_state(mib, s, frozen_share) for s in range(1, saves + 1)]
    times, written, on_disk = [], [], []
    try:
        with unickpt.CheckpointManager(root, keep_last=2, incremental=incremental) as m:
            for s, st in enumerate(states, start=1):
                t0 = time.perf_counter()
                m.save(s, st)
                times.append(time.perf_counter() - t0)
                info = RunRoot(root).read_info(s)
                written.append(info["written_bytes"])
                d = os.path.join(root, f"step_{s}")
                on_disk.append(sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d)
                                   if n.endswith(".safetensors")
                                   and os.stat(os.path.join(d, n)).st_nlink == 1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"seconds": times, "written": written, "new_file_bytes": on_disk,
            "referenced": info["nbytes"]}


def bench(mib: int, saves: int, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {"mib": mib, "saves": saves, "repeats": repeats}
    for name, share in (("frozen95", 0.95), ("allchange", 0.0)):
        runs: dict[bool, list] = {True: [], False: []}
        for _ in range(repeats):
            for incremental in (False, True):  # alternate: background load hits both alike
                runs[incremental].append(one_run(mib, saves, share, incremental))
        res: dict[str, Any] = {}
        for incremental, rs in runs.items():
            key = "incremental" if incremental else "full"
            later = [sum(r["seconds"][1:]) for r in rs]
            res[key] = {"seconds_saves_2_to_n": statistics.median(later),
                        "seconds_all": [r["seconds"] for r in rs],
                        "bytes_written_saves_2_to_n": sum(rs[0]["written"][1:]),
                        "new_file_bytes_saves_2_to_n": sum(rs[0]["new_file_bytes"][1:]),
                        "first_save_seconds": statistics.median(r["seconds"][0] for r in rs),
                        "referenced_per_save": rs[0]["referenced"]}
        f, i = res["full"], res["incremental"]
        res["bytes_ratio"] = f["bytes_written_saves_2_to_n"] / max(1, i["bytes_written_saves_2_to_n"])
        res["time_ratio"] = f["seconds_saves_2_to_n"] / i["seconds_saves_2_to_n"]
        res["slowdown"] = i["seconds_saves_2_to_n"] / f["seconds_saves_2_to_n"] - 1
        out[name] = res
    return out


def render(r: dict[str, Any]) -> str:
    lines = [f"# Incremental checkpoints ({r['mib']} MiB state, {r['saves']} saves, median of "
             f"{r['repeats']})", "",
             "| state | mode | bytes written, saves 2..N | time, saves 2..N | first save |",
             "|---|---|---|---|---|"]
    for name in ("frozen95", "allchange"):
        for mode in ("full", "incremental"):
            x = r[name][mode]
            lines.append(f"| {name} | {mode} | {x['bytes_written_saves_2_to_n'] / 2**20:.1f} MiB"
                         f" | {x['seconds_saves_2_to_n']:.2f} s | {x['first_save_seconds']:.2f} s |")
    fz, ac = r["frozen95"], r["allchange"]
    lines += ["", f"frozen95: {fz['bytes_ratio']:.1f}x fewer bytes (target >= 10x), "
                  f"{fz['time_ratio']:.1f}x less time (target >= 5x)",
              f"allchange: incremental is {100 * ac['slowdown']:+.1f}% vs full saves "
              "(target <= +5%)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--saves", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    r = bench(a.mib, a.saves, a.repeats)
    text = render(r)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "incremental.json"), "w") as f:
            json.dump(r, f, indent=1)
        with open(os.path.join(a.out, "incremental.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
