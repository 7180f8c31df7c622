"""Launch the processes of a multi-process JAX job on CPU as one process group (test helper).

Each process gets ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (D CPU devices) and
its id; the worker calls :func:`init` to join the job through ``jax.distributed`` with gloo
collectives.  The whole group has a hard timeout and is SIGKILLed on the way out, so a hang
can never stall the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from _dist_launch import free_port

from unickpt.testing.multiprocess import ProcessGroup


@dataclass(frozen=True)
class JobResult:
    codes: list[int]  # -9: SIGKILLed
    outputs: list[str]


def launch_jax(script: str, cfg: dict, *, processes: int = 2, devices: int = 2,
               timeout: float = 120.0, check: bool = True,
               env: dict | None = None) -> JobResult:
    """Run ``processes`` copies of ``script CONFIG_JSON PROCESS_ID``; return how they ended.

    With ``check`` a process that exits with anything but 0 fails the test, its output in
    the message (without, the caller checks the codes: -9 for a job that killed itself).
    ``env`` is added to the processes' environment.
    """
    cfg = {"port": free_port(), "processes": processes, **cfg}
    env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    logs = [tempfile.TemporaryFile() for _ in range(processes)]  # a pipe could fill and block

    def outputs() -> list[str]:
        out = []
        for f in logs:
            f.seek(0)
            out.append(f.read().decode(errors="replace"))
        return out

    try:
        with ProcessGroup() as group:
            for pid in range(processes):
                group.start([sys.executable, script, json.dumps(cfg), str(pid)], env=env,
                            stdout=logs[pid], stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            for p in group.procs:
                while p.poll() is None:
                    if time.monotonic() >= deadline:
                        group.kill()
                        raise AssertionError(f"job did not finish in {timeout}s; output:\n"
                                             + "\n---\n".join(o[-3000:] for o in outputs()))
                    time.sleep(0.01)
            codes = [p.wait(10) for p in group.procs]
        outs = outputs()
        if check and any(codes):
            raise AssertionError(f"processes exited with {codes}:\n"
                                 + "\n---\n".join(o[-3000:] for o in outs))
        return JobResult(codes, outs)
    finally:
        for f in logs:
            f.close()
