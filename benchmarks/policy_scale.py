"""How the policy layer scales: a run root holding 10,000 committed checkpoints.

    python benchmarks/policy_scale.py [--n 10000] [--out bench-results]

Builds ``ROOT/step_1 .. step_N`` (tiny real checkpoints, each with a ``loss`` metric in its
info, written without fsync: setup speed only), then times, median of ``--repeats``:
listing (``checkpoints()``, ``latest()``, the raw scan), the start decision of a fresh manager
(``resolve_start()`` with resume="auto"), the pure retention plan over N steps, and a save that
applies retention in steady state (keep_last=N: one old checkpoint deleted per save) and with
``keep_best`` (a fresh manager must read every checkpoint's metrics once).  Writes
``policy_scale.json`` and ``policy_scale.md`` into ``--out``.
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
from collections.abc import Callable
from typing import Any
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's unickpt wins over an installed one

import numpy as np  # noqa: E402

import unickpt  # noqa: E402
from unickpt.format.writer import write_tree  # noqa: E402
from unickpt.manager.run_root import scan  # noqa: E402
from unickpt.policy import retain, to_delete  # noqa: E402
from unickpt.storage import LocalStorage  # noqa: E402

STATE = {"w": np.arange(4, dtype=np.float32), "step": 0}


def build_root(root: str, n: int) -> float:
    """``step_1 .. step_n`` as committed checkpoints; returns the seconds it took."""
    t0 = time.perf_counter()
    os.makedirs(root)
    with mock.patch("os.fsync", lambda fd: None):  # setup only: durability is not measured
        for s in range(1, n + 1):
            d = os.path.join(root, f"step_{s}")
            os.mkdir(d)
            write_tree(d, dict(STATE, step=s),
                       info={"step": s, "time": 1.7e9 + s,
                             "metrics": {"loss": float((s * 7919) % 1000) / 1000}})
    return time.perf_counter() - t0


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    quick = os.environ.get("UNICKPT_BENCH_QUICK", "") not in ("", "0")
    ap.add_argument("--n", type=int, default=1_000 if quick else 10_000,
                    help="checkpoints in the root (default 10,000; 1,000 with "
                    "UNICKPT_BENCH_QUICK=1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    n, reps = args.n, args.repeats
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".policy-", dir=args.out)
    root = os.path.join(work, "run")
    res: dict[str, Any] = {"n": n, "repeats": reps, "cpu_count": os.cpu_count(),
                           "load_at_start": os.getloadavg()}
    try:
        res["build_s"] = build_root(root, n)
        print(f"built {n} checkpoints in {res['build_s']:.1f}s", flush=True)
        mgr = unickpt.CheckpointManager(root)
        res["scan_s"], listing = timed(lambda: scan(LocalStorage(), root), reps)
        assert len(listing.steps) == n
        res["latest_s"], latest = timed(mgr.latest, reps)
        assert latest is not None and latest.step == n
        res["checkpoints_s"], cps = timed(mgr.checkpoints, reps)
        assert len(cps) == n

        def fresh_start() -> Any:
            with unickpt.CheckpointManager(root, resume="auto") as m:
                return m.resolve_start()

        res["resolve_start_s"], d = timed(fresh_start, reps)
        assert d.resume and d.step == n
        steps = list(range(1, n + 1))
        metrics = {s: {"loss": float((s * 7919) % 1000) / 1000} for s in steps}
        res["retention_plan_s"], doomed = timed(
            lambda: to_delete(retain(steps, metrics, keep_last=5, keep_every=1000, keep_best=3,
                                     best_metric="loss")), reps)
        assert 0 < len(doomed) < n

        # Saves: a tiny state, so the figure is the policy/listing overhead at N checkpoints.
        empty = os.path.join(work, "empty")
        k = [0]

        def save_small(m: unickpt.CheckpointManager) -> None:
            k[0] += 1
            assert m.save(k[0], dict(STATE, step=k[0]), metrics={"loss": 0.5})

        with unickpt.CheckpointManager(empty, keep_last=n) as m:
            m.resolve_start()
            res["save_empty_root_s"], _ = timed(lambda: save_small(m), reps)
        step = [n]

        def save_next(m: unickpt.CheckpointManager) -> None:
            step[0] += 1
            assert m.save(step[0], dict(STATE, step=step[0]), metrics={"loss": 0.5})

        with unickpt.CheckpointManager(root, keep_last=n) as m:
            m.resolve_start()
            res["save_keep_last_s"], _ = timed(lambda: save_next(m), reps)  # deletes 1 each
        assert len(os.listdir(root)) <= n + 3

        def first_save_keep_best() -> None:
            with unickpt.CheckpointManager(root, keep_best=n, best_metric="loss") as m:
                m.resolve_start()
                save_next(m)

        res["first_save_keep_best_s"], _ = timed(first_save_keep_best, reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["load_at_end"] = os.getloadavg()
    rows = [("raw scan of the root (listdir + manifest exists)", "scan_s"),
            ("`latest()`", "latest_s"),
            ("`checkpoints()` (reads every manifest's info + sizes)", "checkpoints_s"),
            ("`resolve_start()` of a fresh manager, resume='auto'", "resolve_start_s"),
            ("retention plan `retain()` + `to_delete()` (pure)", "retention_plan_s"),
            ("`save()` of a tiny state, empty root (baseline)", "save_empty_root_s"),
            ("`save()` + retention keep_last=N (deletes 1)", "save_keep_last_s"),
            ("first `save()` with keep_best (reads all metrics)", "first_save_keep_best_s")]
    md = [f"Policy layer over a root with {n:,} committed checkpoints "
          f"({os.cpu_count()} CPUs, load {res['load_at_start'][0]:.2f}; medians of {reps}).", "",
          "| operation | time |", "|---|---:|"]
    md += [f"| {label} | {res[key] * 1000:.1f} ms |" for label, key in rows]
    # Two different things are both called "listing": quote them together, never one alone.
    md += ["", f"Listing {n:,} checkpoints: the directory scan takes "
           f"{res['scan_s'] * 1000:.0f} ms; `checkpoints()`, which also reads every manifest's "
           f"info and sizes, takes {res['checkpoints_s'] * 1000:.0f} ms."]
    with open(os.path.join(args.out, "policy_scale.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "policy_scale.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
