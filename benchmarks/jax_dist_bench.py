"""Multi-process JAX checkpoints: unickpt against Orbax on the same sharded state, in one run.

    python benchmarks/jax_dist_bench.py [--mib 256] [--repeats 5] [--processes 1,2] [--out DIR]

For each process count P (each process with 2 CPU devices, ``jax.distributed`` with gloo
collectives when P > 1) one job builds a state of ``--mib`` MiB: float32 arrays sharded over
all 2P devices (90% of the bytes) and replicated ones (10%).  Then, ``--repeats`` times,
systems alternating so that background load hits both alike:

* **unickpt**: ``CheckpointManager.save`` (every process, collective; durable: fsync, commit)
  and ``CheckpointManager.restore`` onto the same shardings, each with a manager created and
  closed inside the timed region (``resume="auto"``: a restarted job), ``incremental=False``
  (the state does not change between repeats: every save writes every byte, as Orbax does);
* **orbax**: a ``StandardCheckpointer`` (created inside the timed region too),
  ``StandardCheckpointer.save`` + ``wait_until_finished`` (its own multi-process
  protocol) followed, inside the timed region, by an fsync of the files it wrote (Orbax does
  not fsync; unickpt does), and ``StandardCheckpointer.restore`` onto the same shardings.

Every restore of the first repeats is checked bit for bit against the saved state.  Each operation is timed between two barriers (the job's wall time, as process 0 sees it).
Host memory: each process samples its anonymous RSS (and total RSS) during every operation;
the peak rise over the value before it is reported against the bytes of the process's
addressable shards (on CPU the state itself already lives in host memory: a save's rise is
what the checkpointing adds, a restore's includes the restored arrays themselves).
Restores read warm page cache (the files were just written) for both systems alike.
Last, ``unickpt convert --to unickpt`` of the last Orbax checkpoint of the largest job runs
in one process: its time and peak RSS (over that of its imports alone).
Writes ``jax_dist.json`` and ``jax_dist.md`` into ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SYSTEMS = ("unickpt", "orbax")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ in each job process
def _rss() -> tuple[int, int]:
    """(anonymous RSS, total RSS): statm's resident minus shared is the anonymous part."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    resident, shared = int(fields[1]) * _PAGE, int(fields[2]) * _PAGE
    return resident - shared, resident


class _Peak:
    """The peak rise of anonymous and of total RSS over their values at entry (1 ms samples).

    Anonymous memory is what the operation holds; total RSS also counts the page-cache pages
    of memory-mapped files it touched (unickpt restores from mapped files), which the kernel
    can drop at any time.
    """

    def __enter__(self) -> _Peak:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _sample(self) -> None:
        now = _rss()
        self.peak = (max(self.peak[0], now[0]), max(self.peak[1], now[1]))

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self._sample()
        self.rise = self.peak[0] - self.base[0]
        self.rise_total = self.peak[1] - self.base[1]


def _fsync_tree(path: str, pid: int, nproc: int) -> None:
    """fsync what Orbax wrote: each process its own OCDBT tree, process 0 the rest."""
    for dirpath, _dirs, files in os.walk(path):
        rel = os.path.relpath(dirpath, path).split(os.sep)[0]
        mine = rel == f"ocdbt.process_{pid}" if rel.startswith("ocdbt.process_") else pid == 0
        if not mine:
            continue
        for name in files + [""]:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def build_state(mib: int, mesh: Any) -> dict:
    """~``mib`` MiB: 16 sharded float32 arrays (90%) and 4 replicated ones (10%)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    ndev = mesh.devices.size
    total = max(mib << 20, 64 * 1024)
    rows = max(ndev, (int(total * 0.9) // 16 // 4 // 256) // ndev * ndev)
    rep = max(1, int(total * 0.1) // 4 // 4 // 256)

    def make(shape: tuple, spec: Any, seed: int) -> Any:
        def cb(idx: Any) -> Any:
            block = np.arange(np.prod(shape), dtype=np.uint32).reshape(shape)[idx]
            return (block * np.uint32(2654435761) ^ np.uint32(seed)).view(np.float32)

        return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), cb)

    return {"params": {f"w{i}": make((rows, 256), P("d"), i) for i in range(16)},
            "replicated": {f"r{i}": make((rep, 256), P(), 100 + i) for i in range(4)}}


def _timed(name: str, fn: Any) -> tuple[float, int, int]:
    """Seconds between two barriers around ``fn`` (its result ready), and the RSS rises."""
    import jax
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"start {name}")
    with _Peak() as peak:
        t0 = time.perf_counter()
        result = fn()
        if result is not None:
            jax.block_until_ready(result)
        multihost_utils.sync_global_devices(f"end {name}")
        dt = time.perf_counter() - t0
    del result
    return dt, peak.rise, peak.rise_total


def _check(system: str, saved: Any, got: Any) -> None:
    """The restored state is the saved one, shard for shard, bit for bit, same shardings."""
    import jax
    import numpy as np

    for a, b in zip(jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(got),
                    strict=True):
        if not isinstance(b, jax.Array) or b.sharding != a.sharding:
            raise AssertionError(f"{system}: restored {type(b).__name__} "
                                 f"{getattr(b, 'sharding', None)}")
        for x, y in zip(a.addressable_shards, b.addressable_shards, strict=True):
            if np.asarray(x.data).tobytes() != np.asarray(y.data).tobytes():
                raise AssertionError(f"{system}: restored shard {x.index} differs")


def _ops(system: str, step: int, state: Any, target: Any, work: str, pid: int,
         nproc: int) -> tuple[Any, Any]:
    """The save and the restore of ``system`` for ``step``."""
    if system == "unickpt":
        import unickpt

        def manager() -> Any:  # a job (re)starting: resume="auto" picks the newest checkpoint
            # incremental=False: every save writes every byte, as Orbax does (the state does
            # not change between repeats; sharing unchanged arrays would skip the writes)
            return unickpt.CheckpointManager(os.path.join(work, "unickpt"), resume="auto",
                                             keep_last=1, dist_timeout=300, incremental=False)

        def save() -> None:
            with manager() as mgr:
                mgr.save(step, state, force=True)

        def restore() -> Any:
            with manager() as mgr:
                return mgr.restore(target).state

        return save, restore
    import orbax.checkpoint as ocp

    path = os.path.join(work, "orbax", str(step))

    def osave() -> None:
        with ocp.StandardCheckpointer() as ck:
            ck.save(path, state)
            ck.wait_until_finished()
        _fsync_tree(path, pid, nproc)

    def orestore() -> Any:
        with ocp.StandardCheckpointer() as ck:
            return ck.restore(path, target)

    return osave, orestore


def job(cfg: dict, pid: int) -> None:
    """One process of a benchmark job: the repeats of both systems; its figures to a file."""
    import jax

    nproc = cfg["processes"]
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{cfg['port']}", num_processes=nproc,
                                   process_id=pid, initialization_timeout=120)
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    import unickpt

    mesh = jax.make_mesh((len(jax.devices()),), ("d",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    state = build_state(cfg["mib"], mesh)
    leaves = jax.tree_util.tree_leaves(state)
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    out: dict[str, Any] = {s: {k: [] for k in ("save", "restore", "save_rss", "restore_rss",
                                               "save_rss_total", "restore_rss_total")}
                           for s in SYSTEMS}
    for rep in range(cfg["repeats"]):
        step = rep + 1
        for system in SYSTEMS if rep % 2 == 0 else SYSTEMS[::-1]:
            save, restore = _ops(system, step, state, target, cfg["dir"], pid, nproc)
            for op, fn in (("save", save), ("restore", restore)):
                dt, rise, rise_total = _timed(f"{system} {op} {step}", fn)
                out[system][op].append(dt)
                out[system][op + "_rss"].append(rise)
                out[system][op + "_rss_total"].append(rise_total)
            if rep < 2:  # restores checked in the first two repeats, outside the timed region
                _check(system, state, restore())
        multihost_utils.sync_global_devices(f"cleanup {step}")
        if pid == 0 and step < cfg["repeats"]:  # the last one stays for the convert run
            shutil.rmtree(os.path.join(cfg["dir"], "orbax", str(step)), ignore_errors=True)
    doc = {"process": pid, "processes": nproc, "devices": len(jax.local_devices()),
           "addressable_bytes": sum(s.data.nbytes for a in leaves for s in a.addressable_shards),
           "global_bytes": sum(a.nbytes for a in leaves),
           "arrays": len(leaves), "runs": out, "versions": {
               "jax": jax.__version__, "orbax": getattr(ocp, "__version__", "?"),
               "unickpt": unickpt.__version__, "numpy": np.__version__}}
    with open(os.path.join(cfg["out"], f"p{nproc}.{pid}.json"), "w") as f:
        json.dump(doc, f)
    if nproc > 1:
        multihost_utils.sync_global_devices("done")
        jax.distributed.shutdown()


# ------------------------------------------------------------------ the driver
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "adapters"),
                                           os.environ.get("PYTHONPATH", "")])}


def launch(cfg: dict, timeout: float) -> None:
    """Run the job's processes as one process group; kill the group on timeout or failure."""
    import signal

    n = cfg["processes"]
    env = _env()
    cfg = {**cfg, "port": _free_port()}
    logs = [tempfile.TemporaryFile() for _ in range(n)]
    procs: list[subprocess.Popen] = []
    try:
        for pid in range(n):
            procs.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--job", json.dumps(cfg), str(pid)],
                env=env, stdout=logs[pid], stderr=subprocess.STDOUT,
                process_group=procs[0].pid if procs else 0))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(max(1.0, deadline - time.monotonic()))
        if any(p.returncode for p in procs):
            raise RuntimeError(f"job {n} x 2 failed: {[p.returncode for p in procs]}: "
                               + _tail(logs))
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"job {n} x 2 did not finish in {timeout} s: " + _tail(logs)) \
            from None
    finally:
        if procs:
            try:
                os.killpg(procs[0].pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for p in procs:
                p.wait()
        for f in logs:
            f.close()


def _tail(logs: list) -> str:
    out = []
    for f in logs:
        f.seek(0)
        out.append(f.read().decode(errors="replace")[-2000:])
    return "\n---\n".join(out)


def convert_memory(src: str, dst: str, env: dict) -> dict:
    """Peak RSS of ``unickpt convert SRC DST --to unickpt`` (one process) and of its imports."""
    def peak(code: str) -> tuple[int, float]:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-c", code], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            raise RuntimeError(f"{code!r} exited with {p.returncode}")
        return usage.ru_maxrss * 1024, time.perf_counter() - t0

    imports = "import jax, orbax.checkpoint, unickpt_jax.orbax, unickpt.cli"
    base, _ = peak(imports)
    conv, seconds = peak(f"{imports}; raise SystemExit(unickpt.cli.main("
                         f"['convert', {src!r}, {dst!r}, '--to', 'unickpt', '-q']))")
    return {"peak_rss": conv, "imports_rss": base, "seconds": seconds}


def summarize(per_process: list[dict]) -> dict:
    """Per system and operation: best and median of the job's time, peak RSS rise per process."""
    p0 = next(d for d in per_process if d["process"] == 0)
    rows: dict[str, Any] = {}
    for s in SYSTEMS:
        row: dict[str, Any] = {}
        for op in ("save", "restore"):
            t = p0["runs"][s][op]
            row[op + "_best"], row[op + "_median"] = min(t), statistics.median(t)
            row[op + "_gbs"] = p0["global_bytes"] / 1e9 / min(t)
            rise = max(max(d["runs"][s][op + "_rss"]) for d in per_process)
            row[op + "_rss_rise"] = rise
            row[op + "_rss_frac"] = rise / p0["addressable_bytes"]
            row[op + "_rss_total_rise"] = max(max(d["runs"][s][op + "_rss_total"])
                                              for d in per_process)
        rows[s] = row
    u, o = rows["unickpt"], rows["orbax"]
    speedup = {f"{op}_{k}": o[f"{op}_{k}"] / u[f"{op}_{k}"]
               for op in ("save", "restore") for k in ("best", "median")}
    return {"processes": p0["processes"], "devices_per_process": p0["devices"],
            "global_bytes": p0["global_bytes"], "addressable_bytes": p0["addressable_bytes"],
            "arrays": p0["arrays"], "repeats": len(p0["runs"]["unickpt"]["save"]),
            "rows": rows, "speedup_vs_orbax": speedup, "versions": p0["versions"]}


def markdown(results: list[dict], machine: str, convert: dict | None) -> str:
    mib = results[0]["global_bytes"] / 2**20
    lines = [f"# Multi-process JAX checkpoints: unickpt vs Orbax ({mib:.0f} MiB sharded state, "
             f"best / median of {results[0]['repeats']})", "", machine, "",
             "| processes x devices | system | save best | save median | restore best | "
             "restore median | peak anonymous memory rise per process (save / restore, of "
             "addressable) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for s in SYSTEMS:
            row = r["rows"][s]
            lines.append(
                f"| {r['processes']} x {r['devices_per_process']} | {s} | "
                f"{row['save_best']:.3f} s ({row['save_gbs']:.2f} GB/s) | "
                f"{row['save_median']:.3f} s | {row['restore_best']:.3f} s "
                f"({row['restore_gbs']:.2f} GB/s) | {row['restore_median']:.3f} s | "
                f"{row['save_rss_rise'] / 2**20:.1f} MiB ({row['save_rss_frac']:.0%}) / "
                f"{row['restore_rss_rise'] / 2**20:.1f} MiB ({row['restore_rss_frac']:.0%}) |")
    lines.append("")
    for r in results:
        sp = r["speedup_vs_orbax"]
        lines.append(f"{r['processes']} process(es): unickpt is {sp['save_best']:.2f}x Orbax's "
                     f"speed to save (median {sp['save_median']:.2f}x), "
                     f"{sp['restore_best']:.2f}x to restore (median {sp['restore_median']:.2f}x)")
    if convert is not None:
        rise = convert["peak_rss"] - convert["imports_rss"]
        lines += ["", f"`unickpt convert --to unickpt` of the {convert['processes']}-process Orbax "
                  f"checkpoint ({convert['bytes'] / 2**20:.0f} MiB), in one process: "
                  f"{convert['seconds']:.2f} s, peak RSS {convert['peak_rss'] / 2**20:.0f} MiB, "
                  f"{rise / 2**20:.0f} MiB ({rise / convert['bytes']:.0%} of the checkpoint) over "
                  f"its imports alone ({convert['imports_rss'] / 2**20:.0f} MiB): arrays are "
                  "streamed piece by piece."]
    lines += ["", "Speed ratio = Orbax time / unickpt time (> 1: unickpt faster). Both save "
              "durably (Orbax's files fsynced inside its timed region); restores read warm "
              "page cache. Memory rise: the peak of anonymous RSS over its value before the "
              "operation, the largest of any process, against that process's addressable "
              "bytes; on CPU the state itself already lives in host memory, so a restore's rise "
              "includes the restored arrays (100%). Page-cache pages of memory-mapped files "
              "(unickpt restores from mapped files) are not counted: the kernel can drop them; "
              "the total RSS rise is in jax_dist.json (`*_rss_total_rise`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-convert", action="store_true", help="skip the convert measurement")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        for n in (int(x) for x in args.processes.split(",")):
            cfg = {"processes": n, "mib": args.mib, "repeats": args.repeats,
                   "dir": os.path.join(work, f"p{n}"), "out": work}
            os.makedirs(cfg["dir"])
            launch(cfg, args.timeout)
            docs = []
            for pid in range(n):
                with open(os.path.join(work, f"p{n}.{pid}.json")) as f:
                    docs.append(json.load(f))
            results.append(summarize(docs))
            print(json.dumps(results[-1]["speedup_vs_orbax"]), flush=True)
        last = results[-1]
        src = os.path.join(work, f"p{last['processes']}", "orbax", str(args.repeats))
        convert = None if args.no_convert else {
            **convert_memory(src, os.path.join(work, "converted"), _env()),
            "processes": last["processes"], "bytes": last["global_bytes"]}
    cpu = os.cpu_count()
    machine = (f"Machine: {cpu} CPU cores, Python {sys.version.split()[0]}, "
               f"jax {results[0]['versions']['jax']}, orbax-checkpoint "
               f"{results[0]['versions']['orbax']}; 2 virtual CPU devices per process.")
    with open(os.path.join(args.out, "jax_dist.json"), "w") as f:
        json.dump({"machine": machine, "results": results, "convert": convert}, f, indent=1)
    with open(os.path.join(args.out, "jax_dist.md"), "w") as f:
        f.write(markdown(results, machine, convert))
    print(markdown(results, machine, convert))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--job":
        job(json.loads(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(main())
