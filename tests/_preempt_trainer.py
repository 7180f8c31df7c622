"""A trainer for tests/test_preemption.py, run as a subprocess: ``python _preempt_trainer.py CFG``.

CFG is JSON: ``root``, ``total``, ``async`` (async saves), ``lockstep`` (after printing
``step N`` it waits for a line on stdin, so the parent can signal it at an exact step; an
int: only up to that step),
``slow`` (seconds every background commit sleeps: keeps an async save in flight),
``resignal`` (sends itself a second SIGTERM inside the preemption save's commit),
``hang`` (freezes inside the preemption save's commit, for the parent's SIGKILL),
``grace`` (preemption_grace_seconds), ``check_steps`` (preemption_check_every_steps, and no
seconds interval), ``dist`` (``{"rank", "world", "port"}``: a gloo process group whose
:class:`GlooGather` is the preemption agreement's coordinator).  The loop is the documented one: ``save()`` every
step (the schedule says every 5), ``if mgr.preempted: break``.  Its last line is JSON with
the final state's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time

import numpy as np

N = 4096
SAVE_EVERY = 5


def initial_state() -> dict:
    return {"w": np.zeros(N), "rng": np.random.default_rng(1234), "step": 0}


def train_step(state: dict, step: int) -> None:
    """Deterministic given the state: a resumed run must retrace the uninterrupted one."""
    state["w"] = state["w"] * 0.99 + state["rng"].standard_normal(N) / step
    state["step"] = step


def fingerprint(state: dict) -> dict:
    return {"step": state["step"], "w": hashlib.sha256(state["w"].tobytes()).hexdigest(),
            "rng": json.dumps(state["rng"].bit_generator.state, sort_keys=True)}


def reference(total: int) -> dict:
    """The uninterrupted run's final state, computed without any checkpointing."""
    state = initial_state()
    for step in range(1, total + 1):
        train_step(state, step)
    return fingerprint(state)


class GlooGather:
    """The one coordinator method the agreement needs, over torch.distributed (gloo): JSON
    bytes in uint8 tensors (no pickle, unlike ``all_gather_object``)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.world_size = dist.get_world_size()

    def all_gather(self, obj: object, timeout: float) -> list:
        import torch

        # the per-call timeout is the process group's (set at init_process_group)
        data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self.dist.all_gather(sizes, torch.tensor([data.numel()]))
        width = int(max(s.item() for s in sizes))
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[: data.numel()] = data
        outs = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.world_size)]
        self.dist.all_gather(outs, padded)
        return [json.loads(bytes(o[: int(s.item())].tolist())) for o, s in zip(outs, sizes)]


def _init_dist(d: dict) -> GlooGather:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{d['port']}",
                            rank=d["rank"], world_size=d["world"],
                            timeout=datetime.timedelta(seconds=60))
    return GlooGather()


def _wrap_commit(cfg: dict, mgr_box: list) -> None:
    from unickpt.storage import LocalStorage

    original = LocalStorage.commit
    resent: list = []  # one second signal, inside the first commit after the first one

    def commit(self, temp, final, *, replace=False):  # noqa: ANN001
        pre = mgr_box and mgr_box[0]._preemption.flag.count > 0
        if pre and cfg.get("hang"):
            print(f"hanging {os.path.basename(final)}", flush=True)
            time.sleep(600)  # the parent SIGKILLs us here
            os._exit(3)
        if pre and cfg.get("resignal") and not resent:
            resent.append(final)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # let the main thread run the handler mid-save
        if cfg.get("slow") and threading.current_thread() is not threading.main_thread():
            time.sleep(cfg["slow"])
        original(self, temp, final, replace=replace)

    LocalStorage.commit = commit


def main() -> None:
    from unickpt import CheckpointManager

    cfg = json.loads(sys.argv[1])
    box: list = []
    _wrap_commit(cfg, box)
    coord = _init_dist(cfg["dist"]) if cfg.get("dist") else None
    every = {"preemption_check_every_steps": cfg["check_steps"],
             "preemption_check_every_seconds": None} if cfg.get("check_steps") else {}
    with CheckpointManager(cfg["root"], save_every=SAVE_EVERY, async_save=cfg.get("async", False),
                           preemption=True, preemption_grace_seconds=cfg.get("grace", 30.0),
                           **every) as mgr:
        box.append(mgr)
        # With torch.distributed initialized the manager is multi-process by itself: its
        # coordinator carries the preemption agreement (``coord`` only set up the group).
        assert coord is None or mgr.coordinator.world_size == 2
        state = mgr.restore(initial_state()).state
        for step in range(state["step"] + 1, cfg["total"] + 1):
            train_step(state, step)
            print(f"step {step}", flush=True)
            lock = cfg.get("lockstep")  # True, or the last step that waits
            if lock is True or (lock and step <= lock):
                sys.stdin.readline()
            saver = mgr._saver
            inflight = bool(saver and saver._thread and saver._thread.is_alive())
            mgr.save(step, state)
            if mgr.preempted:
                print(f"preempted {step} inflight={int(inflight)} "
                      f"signals={mgr._preemption.flag.count}", flush=True)
                break
    print(json.dumps(fingerprint(state)), flush=True)
    if coord is not None:
        coord.dist.destroy_process_group()


if __name__ == "__main__":
    main()
