"""Manager reliability (issue 18 rows 4, 7, 12, 13; issue 19 items 2 and 10)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import unickpt
from unickpt import CheckpointManager, CorruptCheckpointError
from unickpt.testing.fuzz import read_body, write_body


def _state(i: int) -> dict:
    return {"w": np.full(4, float(i)), "step": i}


def _run(root, steps, **kw) -> None:
    with CheckpointManager(root, **kw) as m:
        for s in steps:
            m.save(s, _state(s), metrics={"loss": 1.0 / s})


# ---------------------------------------------------------------- row 4
def test_huge_sparse_manifest_costs_no_memory(tmp_path):
    _run(tmp_path, [1, 2])
    with open(tmp_path / "step_2" / "manifest.msgpack", "r+b") as f:
        f.truncate(2 << 30)  # 2 GiB, sparse: reading it whole would need 2 GiB
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    m = CheckpointManager(tmp_path)
    assert m.latest().step == 1  # the damaged newest is skipped, as auto-resume does
    with pytest.warns(UserWarning, match="step_2 has a damaged manifest"):
        r = m.restore(_state(0))
    m.close()
    assert r.step == 1 and r.state["w"].tolist() == [1.0] * 4
    assert [c.step for c in CheckpointManager(tmp_path).checkpoints()] == [1, 2]
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200 * 1024


# ---------------------------------------------------------------- row 7
@pytest.mark.parametrize("metrics", [[1, 2], "loss", 7, {"loss": "x"}, {"loss": [1]},
                                     {1: 2.0}, {"loss": True}])
def test_metrics_not_a_map_falls_back(tmp_path, metrics):
    _run(tmp_path, [1, 2])
    body = read_body(tmp_path / "step_2")
    body["info"]["metrics"] = metrics
    write_body(tmp_path / "step_2", body)
    m = CheckpointManager(tmp_path, keep_best=1, best_metric="loss")
    assert m.latest().step == 1
    assert [(c.step, c.metrics) for c in m.checkpoints()] == [(1, {"loss": 1.0}), (2, {})]
    with pytest.warns(UserWarning, match="step_2 has a damaged manifest"):
        d = m.resolve_start()
    assert d.step == 1
    r = m.restore(_state(0))
    assert r.step == 1 and r.metrics == {"loss": 1.0}
    m.save(3, _state(3), metrics={"loss": 2.0})  # retention reads every step's metrics
    m.close()
    # no crash; a step whose metric is unknown is not judged by keep_best (kept)
    assert [c.step for c in m.checkpoints()] == [1, 2, 3]


@pytest.mark.parametrize("info", [{"metrics": [1]}, {"metrics": "x"}, {"metrics": {"a": {}}}])
def test_info_not_usable_with_explicit_resume(tmp_path, info):
    _run(tmp_path, [1, 2])
    body = read_body(tmp_path / "step_2")
    body["info"] = info
    write_body(tmp_path / "step_2", body)
    with pytest.raises(CorruptCheckpointError, match="manifest of .*step_2 is damaged"):
        CheckpointManager(tmp_path, resume=str(tmp_path / "step_2")).resolve_start()
    with CheckpointManager(tmp_path, resume=2) as m:  # by step: the data is fine
        r = m.restore(_state(0))
    assert r.step == 2 and r.metrics == {} and r.state["w"].tolist() == [2.0] * 4


# ---------------------------------------------------------------- row 12
def test_checkpoint_removed_while_read_is_reported_as_removed(tmp_path):
    from unickpt.format.reader import CheckpointReader
    _run(tmp_path, [1])
    reader = CheckpointReader(str(tmp_path / "step_1"))  # manifest read, data not yet
    with CheckpointManager(tmp_path, keep_last=1) as m:  # the writer's retention deletes it
        m.save(2, _state(2))
    assert not (tmp_path / "step_1").exists()
    with pytest.raises(unickpt.CheckpointNotFoundError,
                       match=r"step_1 was removed while it was being read \(deleted by the "
                             r"retention") as ei:
        reader.tree()
    assert not isinstance(ei.value, CorruptCheckpointError)
    reader.close()


def test_missing_array_file_is_still_corrupt(tmp_path):
    _run(tmp_path, [1])
    for f in os.listdir(tmp_path / "step_1"):
        if f != "manifest.msgpack":
            os.unlink(tmp_path / "step_1" / f)
    with pytest.raises(CorruptCheckpointError, match="array file .* is missing"):
        unickpt.load(tmp_path / "step_1")


# ---------------------------------------------------------------- row 13
def _fail_parent_fsync(monkeypatch, root):
    import unickpt.storage.local as local
    real = local.fsync_dir

    def flaky(path):
        if os.path.abspath(path) == str(root):
            raise OSError(5, "Input/output error")
        real(path)
    monkeypatch.setattr(local, "fsync_dir", flaky)


@pytest.mark.parametrize("async_save", [False, True])
def test_failure_after_commit_says_committed(tmp_path, monkeypatch, async_save):
    m = CheckpointManager(tmp_path, async_save=async_save)
    m.save(1, _state(1))
    m.wait()
    _fail_parent_fsync(monkeypatch, tmp_path)
    with pytest.raises((OSError, unickpt.BackgroundSaveError)) as ei:
        m.save(2, _state(2))
        m.wait()
    msg = str(ei.value)
    assert "not committed" not in msg and "nothing was committed" not in msg
    assert f"{tmp_path / 'step_2'} was committed (complete, it will be resumed), but making " \
           "the commit durable (fsync of the run root) then failed: Input/output error" in msg
    monkeypatch.undo()
    assert m.save(2, _state(2)) is False  # saved already: a no-op, not "left by another tool"
    m.save(3, _state(3))
    m.close()
    with CheckpointManager(tmp_path) as m2:
        assert m2.restore(_state(0)).step == 3
    assert [c.step for c in m2.checkpoints()] == [1, 2, 3]


def test_retention_failure_after_commit_says_committed(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path, keep_last=1)
    m.save(1, _state(1))
    monkeypatch.setattr(m.storage, "move_many",
                        lambda pairs: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match=r"step_2 was committed \(complete, it will be resumed\), "
                                      r"but retention \(deleting older checkpoints\) then "
                                      "failed: No space left"):
        m.save(2, _state(2))
    monkeypatch.undo()
    assert m.save(2, _state(2)) is False
    m.save(3, _state(3))
    m.close()
    assert [c.step for c in m.checkpoints()] == [3]


# ---------------------------------------------------------------- issue 19 item 2
def test_damaged_manifest_is_set_aside_and_the_step_saved_again(tmp_path):
    _run(tmp_path, [8, 9])
    man = tmp_path / "step_9" / "manifest.msgpack"
    data = man.read_bytes()
    man.write_bytes(data[: len(data) // 2])
    with CheckpointManager(tmp_path) as m:
        with pytest.warns(UserWarning, match="step_9 has a damaged manifest; resuming from"):
            r = m.restore(_state(0))
        assert r.step == 8
        with pytest.warns(UserWarning, match=r"step_9 has a damaged manifest; it was moved to "
                                             r".*step_9\.damaged-\d{8}T\d{6}Z \(kept for "
                                             "inspection"):
            assert m.save(9, _state(9)) is True
        m.save(10, _state(10))
    names = sorted(os.listdir(tmp_path))
    aside = [n for n in names if n.startswith("step_9.damaged-")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "manifest.msgpack").read_bytes() == \
        data[: len(data) // 2]
    assert [c.step for c in CheckpointManager(tmp_path).checkpoints()] == [8, 9, 10]
    assert unickpt.load(tmp_path / "step_9")["w"].tolist() == [9.0] * 4
    with CheckpointManager(tmp_path) as m:  # the set-aside copy is never cleaned
        assert m.restore(_state(0)).step == 10
    assert aside[0] in os.listdir(tmp_path)


def test_uncommitted_directory_in_the_way_still_refused(tmp_path):
    _run(tmp_path, [1])
    (tmp_path / "step_2").mkdir()
    (tmp_path / "step_2" / "x").write_text("mine")
    with CheckpointManager(tmp_path) as m, \
            pytest.raises(unickpt.CheckpointExistsError, match="left by another tool"):
        m.save(2, _state(2))


def test_damaged_array_in_newest_says_how_to_resume_older(tmp_path):
    _run(tmp_path, [8, 9])
    data = next(p for p in (tmp_path / "step_9").iterdir() if p.name != "manifest.msgpack")
    raw = bytearray(data.read_bytes())
    raw[-3] ^= 0xFF
    data.write_bytes(bytes(raw))
    with CheckpointManager(tmp_path) as m:
        with pytest.raises(CorruptCheckpointError,
                           match=r"step_9.*checksum.*; to resume the previous checkpoint, pass "
                                 r"resume=8 \(or move .*step_9 aside\)") as ei:
            m.restore(_state(0))
    assert ei.value.leaves
    with CheckpointManager(tmp_path, resume=8) as m:  # what the message says works
        assert m.restore(_state(0)).step == 8


# ---------------------------------------------------------------- issue 19 item 10
def test_resumed_checkpoint_released_once_a_newer_one_commits(tmp_path):
    from unickpt.cli.root_listing import collect
    _run(tmp_path, [1, 2, 3], keep_last=3)
    with CheckpointManager(tmp_path, keep_last=1) as m:
        assert m.restore(_state(0)).step == 3
        m.save(4, _state(4))
        assert [c.step for c in m.checkpoints()] == [4]
        m.save(5, _state(5))
    with CheckpointManager(tmp_path, keep_last=3) as m:
        assert m.restore(_state(0)).step == 5
        for s in (6, 7, 8, 9):
            m.save(s, _state(s))
    assert [c.step for c in CheckpointManager(tmp_path).checkpoints()] == [7, 8, 9]
    kept = {c["step"]: c["kept_by"] for c in collect(str(tmp_path))["checkpoints"]}
    assert kept == {7: ["last"], 8: ["last"], 9: ["newest", "last"]}
