"""Multi-process save/restore: unickpt vs torch.distributed.checkpoint (DCP), and the bound.

N processes (1, 2, 4) on a CPU gloo mesh hold an FSDP2-sharded model (Linear layers) and its
AdamW state.  In the same run, interleaved per repeat so that noise hits every system alike:

* **unickpt**: ``CheckpointManager.save`` (every rank its own file, one commit) and
  ``CheckpointManager.restore`` into the live FSDP2 model and optimizer;
* **DCP**: ``dcp.save`` of ``get_state_dict(model, opt)`` and ``dcp.load`` +
  ``set_state_dict`` (what torchtitan does);
* **raw bound**: every rank writes the bytes of its local shards to its own file with plain
  ``write`` calls and ``fsync``: what N processes can write, with no format at all.

A time is rank 0's wall clock between a barrier before and a barrier after the operation, so
it covers the slowest rank.  Restores read checkpoints just written (page cache warm) for
both systems.  Best-of-N and median are reported, with unickpt's aggregate bandwidth as a
fraction of the bound.  ``--quick`` is a tiny state (the smoke test).

    python benchmarks/dist_bench.py [--quick] [--procs 1,2,4] [--repeats 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from typing import Any

from unickpt.testing.multiprocess import ProcessGroup

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = ("unickpt", "dcp", "raw")


# ---------------------------------------------------------------------------- one rank
def _build(layers: int, width: int, world: int) -> tuple[Any, Any]:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=True)
                                  for _ in range(layers)])
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for m in model:
            fully_shard(m, mesh=mesh)
        model = fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()  # creates exp_avg / exp_avg_sq
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def _local_arrays(model: Any, opt: Any) -> list[Any]:
    """This rank's local shards (parameters and optimizer state) as numpy arrays."""
    def local(t: Any) -> Any:
        return (t.to_local() if hasattr(t, "to_local") else t).detach().numpy()

    out = [local(p) for p in model.parameters()]
    for st in opt.state.values():
        out += [local(v) for v in st.values() if v.dim() > 0]
    return out


def _raw_write(path: str, arrays: list[Any]) -> None:
    with open(path, "wb", buffering=0) as f:
        for a in arrays:
            f.write(memoryview(a.reshape(-1).view("uint8")))
        os.fsync(f.fileno())


def _worker(cfg: dict, rank: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import unickpt

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    world = cfg["world"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['port']}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=300))
    model, opt = _build(cfg["layers"], cfg["width"], world)
    arrays = _local_arrays(model, opt)
    local_bytes = sum(a.nbytes for a in arrays)
    times: dict[str, dict[str, list[float]]] = {s: {"save": [], "load": []} for s in SYSTEMS}

    def timed(fn: Any) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    def state() -> dict:
        return {"model": model, "opt": opt}

    for rep in range(cfg["repeats"]):
        base = os.path.join(cfg["dir"], f"r{rep}")
        root, dcp_dir = f"{base}-unickpt", f"{base}-dcp"
        for system in _rotate(SYSTEMS, rep):
            if system == "unickpt":
                mgr = unickpt.CheckpointManager(root, dist_timeout=300)
                times[system]["save"].append(timed(lambda m=mgr: m.save(1, state())))
                mgr.close()
                mgr = unickpt.CheckpointManager(root, dist_timeout=300)
                times[system]["load"].append(timed(lambda m=mgr: m.restore(state())))
                mgr.close()
            elif system == "dcp":
                def dcp_save(dcp_dir: str = dcp_dir) -> None:
                    msd, osd = get_state_dict(model, opt)
                    dcp.save({"model": msd, "optim": osd}, checkpoint_id=dcp_dir)

                def dcp_load(dcp_dir: str = dcp_dir) -> None:
                    msd, osd = get_state_dict(model, opt)
                    sd = {"model": msd, "optim": osd}
                    dcp.load(sd, checkpoint_id=dcp_dir)
                    set_state_dict(model, opt, model_state_dict=sd["model"],
                                   optim_state_dict=sd["optim"])

                times[system]["save"].append(timed(dcp_save))
                times[system]["load"].append(timed(dcp_load))
            else:
                os.makedirs(f"{base}-raw", exist_ok=True)
                path = os.path.join(f"{base}-raw", f"rank{rank}.bin")
                times[system]["save"].append(timed(lambda p=path: _raw_write(p, arrays)))
        dist.barrier()
        if rank == 0:
            for suffix in ("unickpt", "dcp", "raw"):
                shutil.rmtree(f"{base}-{suffix}", ignore_errors=True)
    sizes = [0] * world
    dist.all_gather_object(sizes, local_bytes)
    if rank == 0:
        with open(cfg["result"], "w") as f:
            json.dump({"world": world, "bytes": sum(sizes), "bytes_per_rank": sizes,
                       "times": times}, f)
    dist.destroy_process_group()


def _rotate(items: tuple[str, ...], k: int) -> list[str]:
    k %= len(items)
    return list(items[k:] + items[:k])


# ---------------------------------------------------------------------------- orchestration
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(cfg: dict, timeout: float) -> dict:
    """Run ``cfg["world"]`` ranks in one process group; SIGKILL the group on timeout."""
    cfg = {**cfg, "port": _free_port()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with ProcessGroup() as group:
        for rank in range(cfg["world"]):
            group.start([sys.executable, __file__, "--worker", json.dumps(cfg), str(rank)],
                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs = group.procs
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(max(deadline - time.monotonic(), 0.01))
        if any(p.returncode for p in procs):
            outs = [p.communicate()[0].decode(errors="replace")[-2000:] for p in procs]
            raise RuntimeError(f"world {cfg['world']}: ranks exited with "
                               f"{[p.returncode for p in procs]}:\n" + "\n---\n".join(outs))
        with open(cfg["result"]) as f:
            return json.load(f)


def summarize(job: dict) -> dict:
    """Best and median per system and operation, GB/s, ratios and the bound fraction."""
    out: dict[str, Any] = {"world": job["world"], "bytes": job["bytes"], "rows": {}}
    for system, ops in job["times"].items():
        row: dict[str, Any] = {}
        for op, ts in ops.items():
            if ts:
                row[op] = {"best": min(ts), "median": statistics.median(ts),
                           "spread": max(ts) / min(ts), "gbps": job["bytes"] / min(ts) / 1e9}
        out["rows"][system] = row
    u, d, raw = (out["rows"][s] for s in SYSTEMS)
    for op in ("save", "load"):
        # > 1: unickpt is faster than DCP
        out[f"vs_dcp_{op}"] = {k: d[op][k] / u[op][k] for k in ("best", "median")}
    out["bound_fraction"] = {k: raw["save"][k] / u["save"][k] for k in ("best", "median")}
    return out


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# Multi-process save/restore: unickpt vs DCP (FSDP2 on a CPU gloo mesh)", "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['ram_gib']:.0f} GiB RAM, "
        f"disk {m['disk']}, Python {m['python']}, torch {doc['torch']}. "
        f"{doc['repeats']} repeats, systems interleaved; times are rank 0's wall clock "
        "between barriers (the slowest rank). Restores read a checkpoint just written "
        "(warm page cache) for both systems.", "",
        f"State: {doc['layers']} x Linear({doc['width']}, {doc['width']}) + AdamW state, "
        f"{doc['jobs'][0]['bytes'] / 2**20:.0f} MiB in all, sharded with FSDP2 over N "
        "processes.", "",
        "| N | op | unickpt best / median | DCP best / median | unickpt vs DCP "
        "(best, median) | raw write bound best | unickpt / bound (best, median) |",
        "|---|---|---|---|---|---|---|"]
    for s in doc["jobs"]:
        r = s["rows"]
        for op in ("save", "load"):
            u, d = r["unickpt"][op], r["dcp"][op]
            bound = (f"{r['raw']['save']['best']:.3f}s ({r['raw']['save']['gbps']:.2f} GB/s)"
                     if op == "save" else "")
            frac = (f"{s['bound_fraction']['best']:.2f}x, {s['bound_fraction']['median']:.2f}x"
                    if op == "save" else "")
            lines.append(
                f"| {s['world']} | {op} | {u['best']:.3f}s / {u['median']:.3f}s "
                f"({u['gbps']:.2f} GB/s) | {d['best']:.3f}s / {d['median']:.3f}s | "
                f"{s[f'vs_dcp_{op}']['best']:.2f}x, {s[f'vs_dcp_{op}']['median']:.2f}x | "
                f"{bound} | {frac} |")
    lines += ["", "unickpt vs DCP > 1.00x: unickpt is faster. unickpt / bound: the raw write "
              "time over unickpt's save time (1.00x: as fast as writing the bytes)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny state, 1 repeat (smoke)")
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=None, help="default 5 (quick 1)")
    ap.add_argument("--layers", type=int, default=None, help="Linear layers (default 12)")
    ap.add_argument("--width", type=int, default=None, help="layer width (default 1024)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--workdir", default=None, help="where checkpoints go (default: --out)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    args = ap.parse_args(argv)
    import torch

    sys.path.insert(0, HERE)
    import _report

    repeats = args.repeats or (1 if args.quick else 5)
    layers = args.layers or (2 if args.quick else 12)
    width = args.width or (32 if args.quick else 1024)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".dist-bench-", dir=args.workdir or args.out)
    try:
        jobs = []
        for n in (int(x) for x in args.procs.split(",")):
            cfg = {"world": n, "layers": layers, "width": width, "repeats": repeats,
                   "dir": work, "result": os.path.join(work, f"job{n}.json")}
            jobs.append(summarize(run_job(cfg, args.timeout)))
            print(f"N={n}: save vs DCP {jobs[-1]['vs_dcp_save']['best']:.2f}x, load vs DCP "
                  f"{jobs[-1]['vs_dcp_load']['best']:.2f}x, bound "
                  f"{jobs[-1]['bound_fraction']['best']:.2f}x", file=sys.stderr)
        machine = _report.machine_info(work, [])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"quick": args.quick, "repeats": repeats, "layers": layers, "width": width,
           "torch": torch.__version__, "machine": machine, "jobs": jobs}
    with open(os.path.join(args.out, "dist.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(args.out, "dist.md"), "w") as f:
        f.write(markdown(doc))
    return doc


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
