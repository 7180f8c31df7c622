"""SIGKILL in the middle of incremental saves: the previous checkpoint and every older one
stay intact, bit exact, whatever moment the writer dies at (a torn write of a changed file,
after its shared files are linked but before the commit, right after the commit)."""

from __future__ import annotations

import os

import numpy as np

import unickpt
from unickpt import CheckpointManager
from unickpt.testing.hardkill import run_and_kill

MOMENTS = ("torn_write", "mid_save", "after_save")
KEEP_LAST = 3


def _small_groups() -> None:
    from unickpt.format import groups

    groups.SPLIT_BYTES, groups.ALONE_BYTES, groups.GROUP_BYTES = 0, 256 << 10, 1 << 20
    groups.MERGE_BYTES = 0


def state(step: int) -> dict:
    """Four frozen 1 MiB weights (never change) and 2 MiB of trained state (change always)."""
    frozen = np.arange(1 << 18, dtype=np.uint32) * np.uint32(2654435761)
    trained = np.arange(1 << 19, dtype=np.uint32) ^ np.uint32(step * 7919)
    return {"frozen": {f"w{i}": (frozen + np.uint32(i)).view(np.float32) for i in range(4)},
            "trained": {"a": trained.view(np.float32), "n": np.int64(step)}, "step": step}


def incr_train(root: str, total_steps: int) -> dict:
    _small_groups()
    mode = os.environ["UNICKPT_KILL_CHILD_MODE"]
    with CheckpointManager(root, keep_last=KEEP_LAST, async_save=(mode == "async")) as m:
        step = m.restore(state(0)).step
        while step < total_steps:
            step += 1
            m.save(step, state(step))
            if mode == "async":
                m.wait()
    return {"step": step}


def _bit_exact(path: str, step: int) -> None:
    got, exp = unickpt.load(path, verify=True), state(step)
    for top in ("frozen", "trained"):
        for k, v in exp[top].items():
            assert got[top][k].dtype == v.dtype and got[top][k].tobytes() == v.tobytes(), k
    assert got["step"] == step
    assert unickpt.verify(path).ok


def test_sigkill_mid_incremental_save_leaves_older_checkpoints_intact(tmp_path, monkeypatch):
    # the children scale the groups down (_small_groups); this process only reads
    root = str(tmp_path / "run")
    os.makedirs(root)
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
    last = 0
    for k, (moment, mode) in enumerate([(m, a) for a in ("sync", "async") for m in MOMENTS]):
        monkeypatch.setenv("UNICKPT_KILL_CHILD_MODE", mode)
        stop = last + 1 + k % 2  # the first or the second save of this life
        out = run_and_kill("test_incremental_kill:incr_train", root, 10 ** 6, stop, moment,
                           timeout=300)
        assert out.killed and out.step == stop, out
        last = stop if moment == "after_save" else stop - 1
        steps = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_"))
        assert (steps[-1] if steps else 0) == last and len(steps) <= KEEP_LAST + 1
        for s in steps:  # every checkpoint left, including those sharing files, is whole
            _bit_exact(os.path.join(root, f"step_{s}"), s)
        if len(steps) > 1:  # and the frozen files really are shared between them
            a, b = (os.path.join(root, f"step_{s}") for s in steps[-2:])
            shared = [n for n in os.listdir(b) if n.endswith(".safetensors")
                      and os.path.exists(os.path.join(a, n))
                      and os.path.samefile(os.path.join(a, n), os.path.join(b, n))]
            assert len(shared) == 4, (a, b, os.listdir(b))
        with CheckpointManager(root, keep_last=KEEP_LAST) as m:
            d = m.resolve_start()
            assert d.step == last
        assert [n for n in os.listdir(root) if n.startswith(".unickpt-tmp.")] == []
