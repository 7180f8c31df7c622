"""Benchmark unickpt against its peers on the same states, in one run.

    python benchmarks/run.py [--quick] [--out bench-results] [--repeats 5] [--fs disk,tmpfs]

For each state (``big``: ~1 GiB in 64 float32 arrays; ``small``: 10,000 small arrays;
``transformer``: bf16 weights + fp32 Adam moments) every system saves (durably: peers that do
not fsync get an fsync of what they wrote, inside the timed region) and restores (materialized;
``unickpt (mmap)``, a lazy open, separately), systems alternating round-robin, ``--repeats``
times, once with the checkpoints on the disk and once on tmpfs (``/dev/shm``: the library's own
cost without the disk).  Best-of-N and medians are reported side by side with the spread
(max/min) and whether each ratio is stable, with GB/s, the ratio unickpt/peer and the peak
extra RSS during each save (sampled).  The machine's write bound (best parallel direct write of
the same bytes) and the start-up cost (whole processes, ``startup.py``) are measured in the
same run.  The page cache is dropped before every restore when the process may (root);
otherwise restores are warm-cache reads and the outputs say so.  ``--quick`` (or
``UNICKPT_BENCH_QUICK=1``) shrinks the states so the whole run takes a few minutes.  Writes
``results.json``, ``results.md`` and ``results.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # this checkout's unickpt wins over an installed one

import _bound  # noqa: E402
import _report  # noqa: E402
import _states  # noqa: E402
import numpy as np  # noqa: E402
import startup  # noqa: E402
from _systems import System, all_systems  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")
try:
    _libc = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc: RSS baselines are a little noisier, nothing else changes
    _libc = None


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _settle() -> None:
    """Free what earlier runs left so the next RSS baseline is honest."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


class PeakRSS:
    """Samples this process's RSS every ~2 ms in a thread; ``extra`` = peak - baseline."""

    def __init__(self) -> None:
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss()
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._t is not None
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def drop_caches() -> bool:
    """Drop the page cache (needs root); False when not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _same(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], who: str) -> None:
    if set(expected) != set(got):
        raise AssertionError(f"{who}: restored keys differ ({len(got)} vs {len(expected)})")
    for k, a in expected.items():
        b = np.asarray(got[k])
        if a.shape != b.shape or a.tobytes() != b.tobytes():
            raise AssertionError(f"{who}: {k} differs after restore")


# A system whose save + restore take under FAST_S seconds (median of the first rounds) gets
# extra rounds, up to --fast-repeats: a short operation is the one that a page-cache refill
# or a writeback burst on the other core swings by 2x, and samples of it are cheap.
FAST_S = 1.0


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def bench_state(name: str, tree: dict, systems: list[System], repeats: int, workdir: str,
                drop: bool, log: Any, fs: str = "disk", fast_repeats: int = 0) -> dict:
    flat = _states.flatten(tree)
    size = sum(a.nbytes for a in flat.values())
    native = {s.name: s.prepare(tree) for s in systems}
    # Warm the disk and the kernel's writeback state before anything is timed: otherwise the
    # first save of each state (whichever system goes first) is 3-6x slower than the rest.
    # os.sync first: the previous state's writeback must not run under this state's timings.
    os.sync()
    _warm_disk(os.path.join(workdir, "warmup"), max(16 << 20, size))
    times: dict[str, dict[str, list[float]]] = {
        s.name: {"save": [], "load": [], "rss": [], "load_rss": []} for s in systems}
    times["unickpt (mmap)"] = {"save": [], "load": [], "rss": [], "load_rss": []}
    cold = drop

    def one(rep: int, s: System) -> None:
        nonlocal cold
        path = os.path.join(workdir, f"{name}-{rep}-{s.name.split()[0]}{s.suffix}")
        path = path.replace("(", "").replace(")", "")
        _settle()
        with PeakRSS() as m:
            t0 = time.perf_counter()
            s.save(native[s.name], path)
            dt = time.perf_counter() - t0
        times[s.name]["save"].append(dt)
        times[s.name]["rss"].append(m.extra)
        save_rss = m.extra
        if drop:
            cold = drop_caches() and cold
        _settle()
        with PeakRSS() as m:
            t0 = time.perf_counter()
            out = s.load(path, native[s.name])
            dl = time.perf_counter() - t0
        times[s.name]["load"].append(dl)
        times[s.name]["load_rss"].append(m.extra)
        if rep == 0:
            _same(flat, s.to_numpy(out), s.name)
        del out
        if s.name == "unickpt":
            import unickpt

            if drop:
                cold = drop_caches() and cold
            t0 = time.perf_counter()
            mm = unickpt.load(path, mmap=True)
            times["unickpt (mmap)"]["load"].append(time.perf_counter() - t0)
            if rep == 0:
                _same(flat, _states.flatten(mm), "unickpt (mmap)")
            del mm
        log(f"  {name} [{fs}] rep {rep} {s.name:22s} save {dt:7.3f}s  load {dl:7.3f}s  "
            f"save rss+{save_rss / 2**20:6.1f}MiB")
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)

    for rep in range(repeats):
        for s in systems[rep % len(systems):] + systems[:rep % len(systems)]:  # rotate
            one(rep, s)
    fast = [s for s in systems
            if _median(times[s.name]["save"]) + _median(times[s.name]["load"]) < FAST_S]
    for rep in range(repeats, max(repeats, fast_repeats) if fast else repeats):
        for s in fast[rep % len(fast):] + fast[:rep % len(fast)]:
            one(rep, s)
    if fs == "tmpfs":  # the data live in memory: there is no page cache to drop
        cold = False
    return {"state": name, "fs": fs, "bytes": size, "narrays": len(flat), "cold_cache": cold,
            "cache_note": ("tmpfs (in memory: no disk)" if fs == "tmpfs" else
                           "cold page cache" if cold else "WARM page cache (dropping it "
                           "was not permitted)" if drop else "WARM page cache (not dropped: "
                           "--quick or --no-drop-caches)"),
            "runs": times}


def _warm_disk(path: str, nbytes: int) -> None:
    block = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(max(1, nbytes // block.nbytes)):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.remove(path)


def bench_async(tree: dict, repeats: int, workdir: str, log: Any) -> dict | None:
    """Blocking time of an async save vs a plain copy of every array (allocation included)."""
    import unickpt

    if not hasattr(unickpt, "CheckpointManager"):
        return None
    flat = list(_states.flatten(tree).values())
    copy, block, total = [], [], []
    root = os.path.join(workdir, "async-root")
    with unickpt.CheckpointManager(root, async_save=True, resume="never", keep_last=1) as mgr:
        for rep in range(repeats):
            _settle()
            t0 = time.perf_counter()
            copies = [a.copy() for a in flat]
            copy.append(time.perf_counter() - t0)
            del copies
            _settle()
            t0 = time.perf_counter()
            mgr.save(rep + 1, tree, force=True)
            block.append(time.perf_counter() - t0)
            mgr.wait()
            total.append(time.perf_counter() - t0)
            log(f"  async rep {rep}: memcpy {copy[-1]:.3f}s  save() blocked {block[-1]:.3f}s"
                f"  until durable {total[-1]:.3f}s")
    shutil.rmtree(root, ignore_errors=True)
    return {"memcpy": copy, "blocking": block, "total": total}


def _tmpfs_dir(need: int) -> str | None:
    """A fresh directory on /dev/shm when it exists and has room for ``need`` bytes."""
    if not os.path.isdir("/dev/shm"):
        return None
    st = os.statvfs("/dev/shm")
    if st.f_bavail * st.f_frsize < need:
        return None
    return tempfile.mkdtemp(prefix=".bench-", dir="/dev/shm")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    default=os.environ.get("UNICKPT_BENCH_QUICK", "") not in ("", "0"),
                    help="small states, 3 repeats: a few minutes (or UNICKPT_BENCH_QUICK=1)")
    ap.add_argument("--out", default="bench-results", help="output directory")
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 5, quick 3)")
    ap.add_argument("--fast-repeats", type=int, default=None,
                    help=f"repeats for systems whose save + restore of a state take under "
                         f"{FAST_S:g} s (default 15, quick: --repeats)")
    ap.add_argument("--states", default="big,small,transformer")
    ap.add_argument("--fs", default="disk,tmpfs",
                    help="where checkpoints go: disk (--workdir), tmpfs (/dev/shm), or both")
    ap.add_argument("--systems", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--no-drop-caches", action="store_true", help="keep the page cache")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up processes")
    ap.add_argument("--readme", default=None, metavar="README.md",
                    help="also rewrite that README's Performance section from this run")
    ap.add_argument("--workdir", default=None, help="where checkpoints are written "
                    "(default: a temporary directory inside --out)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    fast_repeats = max(repeats, args.fast_repeats or (repeats if args.quick else 15))
    os.makedirs(args.out, exist_ok=True)
    # absolute: orbax refuses relative checkpoint paths
    workdir = os.path.abspath(tempfile.mkdtemp(prefix=".bench-", dir=args.workdir or args.out))
    drop = not args.no_drop_caches

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    systems, missing = all_systems()
    if args.systems:
        want = {w.strip() for w in args.systems.split(",")}
        systems = [s for s in systems if s.name in want or s.name.split()[0] in want]
    machine = _report.machine_info(workdir, systems)
    machine["load_at_start"] = os.getloadavg()
    log(f"machine: {machine['cpu_count']} cpus, {machine['ram_gib']:.1f} GiB RAM, "
        f"load {machine['load_at_start'][0]:.2f}; systems: {[s.name for s in systems]}")
    big_bytes = _states.nbytes(_states.big(args.quick)) if "big" in args.states else 64 << 20
    dirs = {}
    for fs in args.fs.split(","):
        d = workdir if fs == "disk" else _tmpfs_dir(4 * big_bytes) if fs == "tmpfs" else None
        if d is None:
            log(f"{fs}: not available here, left out")
        else:
            dirs[fs] = d
    results, bound = [], {}
    try:
        for fs, d in dirs.items():  # the bound first: the same bytes as the big state
            bound[fs] = _bound.measure(d, big_bytes, repeats, log)
        for sname in args.states.split(","):
            tree = _states.STATES[sname](args.quick)
            log(f"state {sname}: {_states.nbytes(tree) / 2**20:.1f} MiB")
            for fs, d in dirs.items():
                results.append(bench_state(sname, tree, systems, repeats, d,
                                           drop and fs == "disk", log, fs, fast_repeats))
                _settle()
            del tree
            _settle()
        async_res = None
        if any(s.name == "unickpt" for s in systems):
            async_res = bench_async(_states.big(args.quick), repeats, workdir, log)
    finally:
        for d in dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    start = None if args.no_startup else startup.measure(max(5, repeats), 100, log)
    machine["load_at_end"] = os.getloadavg()
    doc = {"quick": args.quick, "repeats": repeats, "fast_repeats": fast_repeats,
           "fast_s": FAST_S, "machine": machine, "missing": missing,
           "fsync_added": {s.name: s.fsync_added for s in systems},
           "descriptions": _states.DESCRIPTIONS, "states": results, "async": async_res,
           "write_bound": bound, "startup": start,
           "elapsed_s": time.perf_counter() - t_start}
    _report.write_all(doc, args.out)
    log(f"wrote {args.out}/results.json, results.md, results.png in "
        f"{doc['elapsed_s']:.0f}s")
    print(open(os.path.join(args.out, "results.md")).read())
    if args.readme:
        import _readme

        _readme.update(args.readme, os.path.join(args.out, "results.json"))
        log(f"rewrote the Performance section of {args.readme} from this run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
