"""Resumable multi-process JAX training with unickpt, on one machine (CPU devices).

    python examples/jax_multiprocess.py runs/jax_demo --processes 2 --devices 2 --steps 8

starts 2 processes with 2 CPU devices each (the same as 2 hosts of a TPU pod or GPU cluster),
joined by ``jax.distributed``; the parameters and the momentum span both processes (a
``NamedSharding`` over a 2 x 2 mesh), so no process holds a whole array.  Every process runs
the same code it would run alone: the manager detects ``jax.distributed`` and each process
writes only its own shards, process 0 commits.  Kill the job at any moment and run the same
command again: it resumes from the newest committed checkpoint, each process's own PRNG key
back, and ends bit for bit where an uninterrupted run ends.  A checkpoint written here
restores onto any other mesh and process count (``--processes 1 --devices 4``, say; the
per-process keys then need ``restore(..., per_rank="keep")``).  On a real cluster, drop the
launcher: run ``main`` in each host's process with its own ``jax.distributed.initialize()``.
See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time


def main(root: str, steps: int, pid: int, nproc: int, port: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import unickpt

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if nproc > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    mesh = Mesh(np.array(jax.devices()).reshape(nproc, -1), ("data", "model"))

    def global_array(x: np.ndarray, spec: P) -> jax.Array:
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                            lambda idx: x[idx])

    w0 = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32) * 0.1
    state = {
        "params": {"w": global_array(w0, P("data", "model")),
                   "b": global_array(np.zeros(8, np.float32), P("model"))},
        "momentum": {"w": global_array(np.zeros_like(w0), P("data", "model")),
                     "b": global_array(np.zeros(8, np.float32), P("model"))},
        # this process's own randomness (e.g. host-side augmentation): saved per process
        "key": jax.random.key(1000 + jax.process_index()),
        "step": 0,
    }
    mgr = unickpt.CheckpointManager(root, resume="auto", save_every=2, keep_last=2)
    r = mgr.restore(state)
    state, step = r.state, r.step
    if r.resumed:
        print(f"[process {pid}] resumed from step {step}", flush=True)

    @jax.jit
    def train_step(params, mom, x, y):
        def loss_fn(p):
            return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(params)
        mom = jax.tree.map(lambda m, gi: 0.9 * m + gi, mom, g)
        params = jax.tree.map(lambda p, m: p - 0.1 * m, params, mom)
        return params, mom, loss

    while step < steps:
        # this process's own random stream advances every step (differs per process)
        key = jax.random.split(state["key"])[0]
        data = np.random.default_rng(step)  # the global batch of this step
        x = data.normal(size=(8, 16)).astype(np.float32)
        y = data.normal(size=(8, 8)).astype(np.float32)
        params, mom, loss = train_step(state["params"], state["momentum"],
                                       global_array(x, P("data")), global_array(y, P("data")))
        step += 1
        state = {"params": params, "momentum": mom, "key": key, "step": step}
        mgr.save(step, state, metrics={"loss": float(loss)})
    mgr.close()
    full = multihost_utils.process_allgather(state["params"], tiled=True)
    digest = hashlib.sha256(b"".join(np.asarray(full[k]).tobytes() for k in ("b", "w")))
    kd = np.asarray(jax.random.key_data(state["key"])).tobytes().hex()
    print(f"[process {pid}] step {step} params {digest.hexdigest()[:16]} key {kd}", flush=True)


def launch(argv: list[str], nproc: int, devices: int, timeout: float) -> int:
    """Start ``nproc`` processes of this script in one process group; kill all on failure."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    procs: list[subprocess.Popen] = []
    try:
        for pid in range(nproc):
            procs.append(subprocess.Popen(
                [sys.executable, __file__, *argv, "--process-id", str(pid), "--port",
                 str(port)], env=env, process_group=procs[0].pid if procs else 0))
        deadline = time.monotonic() + timeout
        for p in procs:
            p.wait(max(deadline - time.monotonic(), 0.01))
            if p.returncode:
                return p.returncode
        return 0
    finally:
        if procs:
            try:
                os.killpg(procs[0].pid, signal.SIGKILL)  # stragglers of a failed job
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    ap.add_argument("--timeout", type=float, default=300, help="seconds for the whole job")
    ap.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.process_id is None:
        sys.exit(launch([a.root, "--steps", str(a.steps), "--processes", str(a.processes)],
                        a.processes, a.devices, a.timeout))
    main(a.root, a.steps, a.process_id, a.processes, a.port)
