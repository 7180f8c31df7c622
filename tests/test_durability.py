"""Power-loss durability: every commit is fsynced in the right order.

A SIGKILL test cannot see a missing fsync (the page cache outlives the process), so these tests
record the file-system calls of public operations (``unickpt.save``, ``CheckpointManager``)
with :class:`unickpt.testing.durability.SyscallRecorder` and check them against the POSIX model
of what a power loss keeps: data files and the temporary directory fsynced *before* the commit
rename, the parent fsynced *after* it, removals made durable, the ``latest`` pointer written only
once the checkpoint it names is durable.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import unickpt
from unickpt.testing.durability import DurabilityError, Event, SyscallRecorder


def _state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((64, 32)).astype(np.float32),
            "b": np.arange(7, dtype=np.int64), "step": seed}


def _check_commit(rec: SyscallRecorder, final: str) -> None:
    rec.assert_renames_durable()
    rec.assert_durable(final)
    # the commit is a rename into ``final`` (of a directory written elsewhere)
    i = next(i for i, e in enumerate(rec.events) if e.op in ("rename", "exchange")
             and e.path2 == os.path.realpath(final))
    assert rec.events[i].path != rec.events[i].path2


# ---------------------------------------------------------------- the checker itself
def test_model_flags_missing_and_misordered_fsyncs(tmp_path):
    top = str(tmp_path)
    d, f, final = f"{top}/tmp", f"{top}/tmp/data", f"{top}/final"
    good = [Event("create_dir", d), Event("create_file", f), Event("write", f),
            Event("fsync", f), Event("fsync", d), Event("rename", d, final), Event("fsync", top)]
    rec = SyscallRecorder(top)
    rec.events = list(good)
    assert rec.rename_violations() == []
    assert rec.durability_problems(final) == []
    for drop, expect in [(3, "tmp/data: bytes written"), (4, "tmp/data: name not durable")]:
        rec.events = good[:drop] + good[drop + 1:]
        assert any(expect in v for v in rec.rename_violations()), (drop, rec.rename_violations())
    rec.events = good[:-1]  # parent not fsynced after the rename
    assert rec.durability_problems(final) == ["final: name not durable (parent not fsynced "
                                              "after the change)"]
    with pytest.raises(DurabilityError, match="final is not durable"):
        rec.assert_durable(final)
    # wrong order: the parent fsynced before the rename, the file fsynced after it
    rec.events = good[:3] + [Event("fsync", d), Event("fsync", top), Event("rename", d, final),
                             Event("fsync", f"{final}/data")]
    assert rec.rename_violations() and rec.durability_problems(final)


def test_recorder_sees_real_calls(tmp_path):
    top = str(tmp_path)
    originals = (os.rename, os.fsync, os.mkdir, open)
    with SyscallRecorder(top) as rec:
        os.mkdir(f"{top}/d")
        fd = os.open(f"{top}/d/x", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.pwrite(fd, b"abc", 0)
        os.close(fd)
        os.rename(f"{top}/d", f"{top}/e")
    assert [e.op for e in rec.events] == ["create_dir", "create_file", "write", "rename"]
    assert len(rec.rename_violations()) == 1
    assert (os.rename, os.fsync, os.mkdir, open) == originals  # all restored


# ---------------------------------------------------------------- public operations
def test_save_is_durable(tmp_path):
    final = tmp_path / "ckpt"
    with SyscallRecorder(tmp_path) as rec:
        unickpt.save(final, _state())
    _check_commit(rec, str(final))
    assert not [n for n in os.listdir(tmp_path) if n != "ckpt"]


def test_save_overwrite_is_durable_and_old_removal_too(tmp_path):
    final = tmp_path / "ckpt"
    unickpt.save(final, _state(1))
    with SyscallRecorder(tmp_path) as rec:
        unickpt.save(final, _state(2), overwrite=True)
    _check_commit(rec, str(final))
    np.testing.assert_array_equal(unickpt.load(final)["b"], _state(2)["b"])


def test_manager_save_and_latest_pointer_are_durable(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    with SyscallRecorder(tmp_path) as rec, unickpt.CheckpointManager(root) as mgr:
        mgr.save(1, _state(1))
    final = str(root / "step_1")
    _check_commit(rec, final)
    latest = root / "latest"
    assert latest.read_text().strip() == "step_1"
    rec.assert_durable(latest)
    # the pointer must never name a checkpoint that a power loss could take away
    i = next(i for i, e in enumerate(rec.events)
             if e.op in ("rename", "exchange") and e.path2 == os.path.realpath(latest))
    assert rec.model_at(i + 1).problems(os.path.realpath(final)) == []


def test_retention_deletes_are_durable(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    with unickpt.CheckpointManager(root, keep_last=1) as mgr:
        mgr.save(1, _state(1))
        with SyscallRecorder(tmp_path) as rec:
            mgr.save(2, _state(2))
    _check_commit(rec, str(root / "step_2"))
    rec.assert_durably_absent(root / "step_1")
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == ["step_2"]


def test_archive_on_cold_start_is_durable(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    with unickpt.CheckpointManager(root) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
    with SyscallRecorder(tmp_path) as rec, \
            unickpt.CheckpointManager(root, resume="never") as mgr:
        decision = mgr.resolve_start()
        mgr.save(1, _state(3))
    assert decision.archived_to
    rec.assert_renames_durable()
    for name in ("step_1", "step_2"):
        rec.assert_durable(os.path.join(decision.archived_to, name))
    rec.assert_durable(root / "step_1")
    np.testing.assert_array_equal(unickpt.load(root / "step_1")["w"], _state(3)["w"])


def test_new_run_root_with_missing_parents_is_durable(tmp_path):
    root = tmp_path / "a" / "b" / "run"
    with SyscallRecorder(tmp_path) as rec, unickpt.CheckpointManager(root) as mgr:
        mgr.save(1, _state(1))
    rec.assert_renames_durable()
    rec.assert_durable(root / "step_1")  # needs a, b and run made durable in their parents


def test_new_run_root_commit_itself_is_durable(tmp_path):
    # what already holds for a new root: the checkpoint inside it, up to the root itself
    root = tmp_path / "a" / "b" / "run"
    with SyscallRecorder(tmp_path) as rec, unickpt.CheckpointManager(root) as mgr:
        mgr.save(1, _state(1))
    rec.assert_renames_durable()
    sub = SyscallRecorder(root)
    sub.events = rec.events
    sub.assert_durable(root / "step_1")


def test_async_manager_save_is_durable(tmp_path):
    # the commit happens on the saver thread: the recorder sees its calls too
    root = tmp_path / "run"
    root.mkdir()
    with SyscallRecorder(tmp_path) as rec, \
            unickpt.CheckpointManager(root, async_save=True, keep_last=1) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
        mgr.wait()
    _check_commit(rec, str(root / "step_2"))
    rec.assert_durably_absent(root / "step_1")
    rec.assert_durable(root / "latest")
