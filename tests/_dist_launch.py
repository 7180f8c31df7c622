"""Launch the ranks of a test job as one process group, with a hard timeout (test helper)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from unickpt.testing.multiprocess import ProcessGroup

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: dict, *, timeout: float = 90.0, worker: str = WORKER,
           env: dict | None = None) -> list[int]:
    """Run ``cfg["world"]`` ranks of ``worker``; return their exit codes (-9: SIGKILLed).

    Each rank runs ``python WORKER CONFIG_JSON RANK`` with ``env`` added to the environment.
    All ranks share one new process group; on timeout the whole group is SIGKILLed and the
    test fails, so a hang can never stall the suite.
    """
    cfg = {"port": free_port(), **cfg}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    with ProcessGroup() as group:
        for rank in range(cfg["world"]):
            group.start([sys.executable, worker, json.dumps(cfg), str(rank)], env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs = group.procs
        deadline = time.monotonic() + timeout
        for p in procs:
            left = deadline - time.monotonic()
            try:
                p.wait(max(left, 0.01))
            except subprocess.TimeoutExpired:
                group.kill()
                outs = [p.communicate()[0].decode(errors="replace")[-2000:] for p in procs]
                raise AssertionError(f"job did not finish in {timeout}s; output:\n"
                                     + "\n---\n".join(outs)) from None
        codes = [p.returncode for p in procs]
        if any(c not in (0, 3, -9) for c in codes):
            outs = [p.communicate()[0].decode(errors="replace")[-3000:] for p in procs]
            raise AssertionError(f"ranks exited with {codes}:\n" + "\n---\n".join(outs))
        return codes


def assert_gathered_equal_saved(saved: dict, got: dict) -> None:
    """A world-size-1 restore (``got``: the worker's gathered ``params`` and ``opt``) equals
    the checkpoint's model and optimizer state (``saved``), bit for bit, leaf by leaf."""
    import numpy as np
    from _bitwise import assert_bitwise_equal

    for name, arr in saved["model"].items():
        assert_bitwise_equal(np.asarray(arr), got["params"][name], ("params", name))
    for name, st in saved["opt"]["state"].items():
        for k, v in st.items():
            assert_bitwise_equal(np.asarray(v).reshape(np.shape(got["opt"][name][k])),
                                 got["opt"][name][k], ("opt", name, k))


def assert_rank_missed_report(cfg: dict, step: int, missing: int) -> None:
    """Rank 0 of the job ``cfg`` failed with a CoordinationError at ``save step_{step}:
    report`` naming rank ``missing`` as the one that did not arrive."""
    with open(f"{cfg['out']}.r0.error.json") as f:
        err = json.load(f)
    assert err["type"] == "CoordinationError"
    assert f"save step_{step}: report" in err["message"] and \
        f"rank(s) {missing} did not arrive" in err["message"], err["message"]
    assert err["missing"] == [missing]
