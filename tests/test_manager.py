"""CheckpointManager: resume modes, archive, schedule, retention, restore, errors, pointer."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import unickpt
from unickpt import (
    CheckpointExistsError,
    CheckpointManager,
    CheckpointNotFoundError,
    ConfigError,
    IncompatibleCheckpointError,
    RunRootError,
)
from unickpt.storage import host_tag


def state(v: float = 0.0, n: int = 4) -> dict:
    return {"params": {"w": np.full((n, 3), v, np.float32), "b": np.full(3, v, np.float64)},
            "opt": {"mu": np.full((n, 3), -v, np.float32)}, "step": int(v)}


def fill(root, steps, **opts) -> None:
    with CheckpointManager(root, **opts) as m:
        m.resolve_start()
        for s in steps:
            assert m.save(s, state(s), metrics={"loss": 1.0 / (s + 1)}) is True


def names(root) -> list[str]:
    return sorted(n for n in os.listdir(root) if not n.startswith("."))


# ---------------------------------------------------------------- resume modes
def test_cold_start_returns_state_untouched(tmp_path):
    s = state(5)
    with CheckpointManager(tmp_path / "run") as m:
        r = m.restore(s)
    assert (r.step, r.resumed, r.path) == (0, False, None)
    assert r.state is s and r.metrics == {} and r.metadata == {}


def test_auto_resumes_newest_bit_exact(tmp_path):
    fill(tmp_path, [1, 2, 3])
    with CheckpointManager(tmp_path) as m:
        r = m.restore(state(0))
        d = m.resolve_start()
    assert (d.resume, d.step, d.path) == (True, 3, str(tmp_path / "step_3"))
    assert "newest committed" in d.reason and d.archived_to is None
    assert r.step == 3 and r.resumed and r.path == str(tmp_path / "step_3")
    exp = state(3)
    for k in ("w", "b"):
        assert r.state["params"][k].tobytes() == exp["params"][k].tobytes()
        assert r.state["params"][k].dtype == exp["params"][k].dtype
        assert r.state["params"][k].flags.writeable  # a copy, not the read-only memory map
    assert r.state["step"] == 3 and r.metrics == {"loss": 0.25}


def test_auto_skips_uncommitted_and_temp_dirs(tmp_path):
    fill(tmp_path, [1, 2])
    os.mkdir(tmp_path / "step_9")  # no manifest: not committed
    os.mkdir(tmp_path / ".unickpt-tmp.step_10.otherhost.1.abcd1234")
    with CheckpointManager(tmp_path) as m:
        assert m.resolve_start().step == 2
        assert [c.step for c in m.checkpoints()] == [1, 2]


def test_must_without_checkpoint_raises(tmp_path):
    with CheckpointManager(tmp_path, resume="must") as m:
        with pytest.raises(CheckpointNotFoundError, match="resume='must'.*no committed"):
            m.resolve_start()
    assert not os.path.exists(tmp_path / "step_0")


def test_must_with_checkpoint(tmp_path):
    fill(tmp_path, [4])
    with CheckpointManager(tmp_path, resume="must") as m:
        assert m.restore(state(0)).step == 4


def test_never_archives_into_next_run(tmp_path):
    fill(tmp_path, [1, 2])
    os.mkdir(tmp_path / "run_2")
    os.mkdir(tmp_path / "run_10")
    os.mkdir(tmp_path / "step_7")  # uncommitted: never moved
    with CheckpointManager(tmp_path, resume="never") as m:
        d = m.resolve_start()
        assert m.resolve_start() is d  # idempotent
        r = m.restore(state(0))
    assert (d.resume, d.step, d.path) == (False, 0, None)
    assert d.archived_to == str(tmp_path / "run_11")
    assert d.archived == ("step_1", "step_2")
    assert sorted(os.listdir(tmp_path / "run_11")) == ["step_1", "step_2"]
    assert names(tmp_path) == ["run_10", "run_11", "run_2", "step_7"]
    assert not r.resumed and r.step == 0
    # the archived checkpoints still load
    assert unickpt.load(tmp_path / "run_11" / "step_2")["step"] == 2
    # a fresh manager with the same options archives nothing more
    with CheckpointManager(tmp_path, resume="never") as m:
        assert m.resolve_start().archived_to is None


def test_never_with_error_refuses(tmp_path):
    fill(tmp_path, [1])
    with CheckpointManager(tmp_path, resume="never", on_existing="error") as m:
        with pytest.raises(CheckpointExistsError, match="step_1.*on_existing='error'"):
            m.resolve_start()
    assert names(tmp_path) == ["latest", "step_1"]


def test_explicit_int_step_archives_newer(tmp_path):
    fill(tmp_path, [1, 2, 3])
    with CheckpointManager(tmp_path, resume=2) as m:
        r = m.restore(state(0))
        assert r.step == 2 and r.state["params"]["w"][0, 0] == 2
        assert m.resolve_start().archived == ("step_3",)
        assert m.save(3, state(30)) is True  # not a no-op: the old step_3 was moved away
    assert unickpt.load(tmp_path / "step_3")["step"] == 30
    assert unickpt.load(tmp_path / "run_1" / "step_3")["step"] == 3


def test_explicit_int_step_missing(tmp_path):
    fill(tmp_path, [1, 3])
    with CheckpointManager(tmp_path, resume=2) as m:
        with pytest.raises(CheckpointNotFoundError, match=r"no committed step_2 .*1, 3"):
            m.resolve_start()


def test_explicit_path_outside_root(tmp_path):
    fill(tmp_path / "pre", [7])
    fill(tmp_path / "run", [1])
    with CheckpointManager(tmp_path / "run", resume=str(tmp_path / "pre" / "step_7")) as m:
        r = m.restore(state(0))
        d = m.resolve_start()
    assert r.step == 7 and r.path == str(tmp_path / "pre" / "step_7")
    assert d.archived == ("step_1",)  # the root's own history does not continue


def test_explicit_path_inside_root_is_its_step(tmp_path):
    fill(tmp_path, [1, 2])
    with CheckpointManager(tmp_path, resume=tmp_path / "step_1") as m:
        assert m.restore(state(0)).step == 1
        assert m.resolve_start().archived == ("step_2",)


@pytest.mark.parametrize("make", ["missing", "file", "plain_dir", "temp"])
def test_resume_path_not_a_checkpoint(tmp_path, make):
    p = tmp_path / ("x" if make != "temp" else ".unickpt-tmp.step_1.h.1.abcd1234")
    if make == "file":
        p.write_text("hi")
    elif make in ("plain_dir", "temp"):
        p.mkdir()
    with CheckpointManager(tmp_path / "run", resume=str(p)) as m:
        with pytest.raises(CheckpointNotFoundError, match="is not a committed checkpoint"):
            m.resolve_start()
    assert not os.path.exists(tmp_path / "run")  # nothing touched


def test_enabled_false_does_nothing(tmp_path):
    fill(tmp_path, [1])
    s = state(9)
    with CheckpointManager(tmp_path, enabled=False, resume="never") as m:
        r = m.restore(s)
        assert m.save(2, s, force=True) is False
        d = m.resolve_start()
    assert r.state is s and r.step == 0 and not r.resumed
    assert d.reason == "checkpointing disabled" and d.archived_to is None
    assert names(tmp_path) == ["latest", "step_1"]
    assert not os.path.exists(tmp_path / "nothing")
    with CheckpointManager(tmp_path / "nothing", enabled=False) as m:
        m.save(1, s, force=True)
    assert not os.path.exists(tmp_path / "nothing")


# ---------------------------------------------------------------- schedule
def test_save_every_and_force_and_same_step(tmp_path):
    with CheckpointManager(tmp_path, save_every=3) as m:
        wrote = [s for s in range(1, 11) if m.save(s, state(s))]
        assert wrote == [3, 6, 9]
        assert m.save(10, state(10), force=True) is True
        assert m.save(10, state(99), force=True) is False  # same step twice: no-op
    assert unickpt.load(tmp_path / "step_10")["step"] == 10


def test_final_forced_save_on_interval_writes_nothing_new(tmp_path):
    with CheckpointManager(tmp_path, save_every=5) as m:
        assert m.save(5, state(5))
        mtime = os.stat(tmp_path / "step_5" / "manifest.msgpack").st_mtime_ns
        assert m.save(5, state(5), force=True) is False
    assert os.stat(tmp_path / "step_5" / "manifest.msgpack").st_mtime_ns == mtime


def test_save_every_seconds(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("unickpt.manager.core.time.monotonic", lambda: clock[0])
    with CheckpointManager(tmp_path, save_every_seconds=60) as m:
        assert m.save(1, state(1)) is False
        clock[0] += 61
        assert m.save(2, state(2)) is True
        clock[0] += 30
        assert m.save(3, state(3)) is False
        clock[0] += 31
        assert m.save(4, state(4)) is True
    assert [c.step for c in CheckpointManager(tmp_path).checkpoints()] == [2, 4]


def test_no_schedule_saves_every_call_and_resumed_step_is_noop(tmp_path):
    fill(tmp_path, [1, 2])
    with CheckpointManager(tmp_path) as m:
        r = m.restore(state(0))
        assert m.save(r.step, r.state) is False
        assert m.save(1, state(1)) is False  # already saved: a no-op
        with pytest.raises(ConfigError, match="already has the newer step_2"):
            m.save(0, state(0))


# ---------------------------------------------------------------- retention
def test_keep_last(tmp_path):
    fill(tmp_path, range(1, 8), keep_last=2)
    assert names(tmp_path) == ["latest", "step_6", "step_7"]


def test_keep_every_and_best(tmp_path):
    with CheckpointManager(tmp_path, keep_last=1, keep_every=4, keep_best=1,
                           best_metric="acc", best_mode="max") as m:
        for s in range(1, 10):
            m.save(s, state(s), metrics={"acc": {3: 0.9, 5: 0.95}.get(s, 0.1)} if s != 6
                   else None)
    assert names(tmp_path) == ["latest", "step_4", "step_5", "step_8", "step_9"]


def test_resumed_from_checkpoint_released_once_a_newer_one_commits(tmp_path):
    # issue 19 item 10: protection lasts until the run can resume from a newer checkpoint
    fill(tmp_path, [1, 2, 3])
    with CheckpointManager(tmp_path, resume=1, keep_last=1, on_existing="archive") as m:
        m.restore(state(0))
        for s in (2, 3, 4):
            m.save(s, state(s))
    assert names(tmp_path) == ["latest", "run_1", "step_4"]


def test_no_retention_keeps_all(tmp_path):
    fill(tmp_path, range(1, 6))
    assert names(tmp_path) == ["latest"] + [f"step_{i}" for i in range(1, 6)]


# ---------------------------------------------------------------- records, pointer
def test_checkpoint_info_records_and_logs(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="unickpt"):
        with CheckpointManager(tmp_path) as m:
            m.save(5, state(5), metrics={"loss": np.float32(0.5)}, metadata={"run": "a"})
    info = unickpt.inspect(tmp_path / "step_5").info
    meta = unickpt.inspect(tmp_path / "step_5").metadata
    assert meta == {"run": "a"}
    assert info["step"] == 5 and info["metrics"] == {"loss": 0.5}
    assert info["unickpt_version"] == unickpt.__version__
    assert info["host"] and info["nbytes"] == 4 * 3 * 4 * 2 + 3 * 8
    assert info["save_seconds"] > 0 and info["bandwidth"] > 0
    assert isinstance(info["frameworks"], dict)
    assert any("saved" in r.message and "MB/s" in r.message for r in caplog.records)
    c = CheckpointManager(tmp_path).latest()
    assert c.step == 5 and c.metrics == {"loss": 0.5} and c.size > info["nbytes"]
    assert abs(c.time - info["time"]) < 1e-6


def test_latest_pointer_and_scan_wins(tmp_path):
    fill(tmp_path, [1, 2])
    assert (tmp_path / "latest").read_text() == "step_2\n"
    (tmp_path / "latest").write_text("step_1\n")  # a stale pointer: the scan is the truth
    with CheckpointManager(tmp_path) as m:
        assert m.resolve_start().step == 2
    (tmp_path / "latest").write_text("step_99\n")
    assert CheckpointManager(tmp_path).latest().step == 2


def test_lookups_have_no_side_effects(tmp_path):
    m = CheckpointManager(tmp_path / "run", resume="never")
    assert m.checkpoints() == [] and m.latest() is None
    assert not os.path.exists(tmp_path / "run")
    fill(tmp_path / "run", [1])
    m2 = CheckpointManager(tmp_path / "run", resume="never")
    assert [c.step for c in m2.checkpoints()] == [1]
    assert names(tmp_path / "run") == ["latest", "step_1"]  # nothing archived by a lookup
    m2.close()


# ---------------------------------------------------------------- restore checks
def test_incompatible_restore_lists_every_path(tmp_path):
    fill(tmp_path, [1])
    target = {"params": {"w": np.zeros((5, 3), np.float32), "b": np.zeros(3, np.float32),
                         "extra": np.zeros(1)}, "step": 0}
    with CheckpointManager(tmp_path) as m:
        with pytest.raises(IncompatibleCheckpointError) as ei:
            m.restore(target)
    e = ei.value
    assert e.missing == ["params/extra"] and e.unexpected == ["opt"]
    assert [p for p, _ in e.mismatched] == ["params/b", "params/w"]
    assert "float32[5, 3]" in str(e) and "step_1" in str(e)
    assert target["params"]["w"].sum() == 0  # nothing applied


def test_partial_restore(tmp_path):
    fill(tmp_path, [2])
    target = {"params": {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3)}, "head": 7}
    with CheckpointManager(tmp_path) as m:
        r = m.restore(target, strict=False)
    assert r.state["params"]["w"][0, 0] == 2 and r.state["head"] == 7
    s = state(0)
    with CheckpointManager(tmp_path) as m:
        r = m.restore(s, select=["params/w"])
    assert r.state["params"]["w"][0, 0] == 2 and r.state["params"]["b"][0] == 0
    assert r.state["opt"]["mu"][0, 0] == 0


class Counter:
    """A user Stateful object (like a sampler position)."""

    def __init__(self):
        self.n = 0
        self.seen = np.zeros(5, np.int64)

    def state_dict(self):
        return {"n": self.n, "seen": self.seen}

    def load_state_dict(self, sd):
        self.n = sd["n"]
        self.seen = np.array(sd["seen"])


def test_stateful_object_round_trip(tmp_path):
    c = Counter()
    c.n, c.seen = 41, np.arange(5)
    with CheckpointManager(tmp_path) as m:
        m.save(1, {"sampler": c})
    fresh = Counter()
    with CheckpointManager(tmp_path) as m:
        r = m.restore({"sampler": fresh})
    assert r.state["sampler"] is fresh and fresh.n == 41
    assert fresh.seen.tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("opts, msg", [
    ({"resume": "latest"}, "resume='latest' is not allowed; use one of 'auto'"),
    ({"resume": "Auto"}, "resume='Auto' is not allowed"),
    ({"resume": True}, "resume=True is not allowed"),
    ({"resume": -1}, "a step is >= 0"),
    ({"on_existing": "delete"}, "use 'archive' or 'error'"),
    ({"keep_last": 0}, "keep_last=0 is not allowed; use a positive int"),
    ({"save_every": 2.5}, "save_every=2.5 is not allowed"),
    ({"save_every_seconds": -1}, "positive number of seconds"),
    ({"keep_best": 2}, "keep_best needs best_metric"),
    ({"best_metric": "loss"}, "best_metric is only used by keep_best"),
    ({"best_mode": "lowest"}, "use 'min' or 'max'"),
    ({"enabled": "yes"}, "enabled='yes' is not allowed; use True or False"),
    ({"keep": 3}, "unknown CheckpointManager option.*keep.*allowed: resume"),
])
def test_bad_options_rejected_before_io(tmp_path, opts, msg):
    with pytest.raises(ConfigError, match=msg):
        CheckpointManager(tmp_path / "run", **opts)
    assert not os.path.exists(tmp_path / "run")


def test_root_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(RunRootError, match="exists and is not a directory"):
        CheckpointManager(tmp_path / "f").resolve_start()
    with pytest.raises(RunRootError, match="cannot create run root"):
        CheckpointManager(tmp_path / "f" / "sub").save(1, state(1))


def test_unwritable_root(tmp_path):
    if os.geteuid() == 0:  # root ignores permission bits; sysfs refuses even root
        root, match = "/sys/unickpt-test-root", "cannot create run root"
    else:
        root = tmp_path / "ro"
        root.mkdir()
        root.chmod(0o500)
        match = "not writable"
    with pytest.raises(RunRootError, match=match):
        CheckpointManager(root).resolve_start()


def test_bad_step_and_metrics(tmp_path):
    with CheckpointManager(tmp_path) as m:
        with pytest.raises(ConfigError, match="non-negative int"):
            m.save(-1, state())
        with pytest.raises(ConfigError, match="non-negative int"):
            m.save(1.0, state())
        with pytest.raises(unickpt.UnsupportedLeafError, match="metric 'name' is str"):
            m.save(1, state(), metrics={"name": "x"})
        with pytest.raises(unickpt.UnsupportedLeafError, match="cannot save x"):
            m.save(1, {"x": object()})
    assert names(tmp_path) == []


def test_closed_manager_refuses(tmp_path):
    m = CheckpointManager(tmp_path)
    m.close()
    with pytest.raises(unickpt.ManagerClosedError, match="is closed; create a new one") as ei:
        m.save(1, state())
    assert isinstance(ei.value, RuntimeError)


def test_corrupt_checkpoint_is_reported_on_restore(tmp_path):
    fill(tmp_path, [1])
    data = tmp_path / "step_1" / "arrays.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0x01  # flip one bit of the last array's data
    data.write_bytes(bytes(raw))
    target = state(0)
    with CheckpointManager(tmp_path) as m:
        with pytest.raises(unickpt.CorruptCheckpointError, match="step_1: leaf .*checksum"):
            m.restore(target)
    assert target["params"]["w"].sum() == 0


def test_damaged_newest_manifest_falls_back(tmp_path):
    fill(tmp_path, [1, 2])
    (tmp_path / "step_2" / "manifest.msgpack").write_bytes(b"\x00garbage")
    with CheckpointManager(tmp_path) as m:
        with pytest.warns(UserWarning, match="step_2 has a damaged manifest"):
            assert m.resolve_start().step == 1
        # issue 19 item 2: the damaged directory is set aside (never deleted), the save proceeds
        with pytest.warns(UserWarning, match=r"step_2 has a damaged manifest; it was moved to"):
            assert m.save(2, state(2)) is True
    assert [n for n in names(tmp_path) if n.startswith("step_2.damaged-")]


def test_pointer_temp_files_are_cleaned(tmp_path):
    fill(tmp_path, [1])
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    (tmp_path / f".unickpt-tmp.latest.{host_tag()}.{p.pid}.abcd1234").write_text("step_")
    with CheckpointManager(tmp_path) as m:
        m.resolve_start()
    assert names(tmp_path) == ["latest", "step_1"]
    assert [n for n in os.listdir(tmp_path) if n.startswith(".unickpt-tmp")] == []


def test_config_object_or_keywords_not_both(tmp_path):
    cfg = unickpt.ManagerConfig(keep_last=1, save_every=2)
    with CheckpointManager(tmp_path, config=cfg) as m:
        assert m.config is cfg
        assert [m.save(s, {"x": np.full(2, s)}) for s in (1, 2, 3, 4)] == [False, True, False, True]
        assert [c.step for c in m.checkpoints()] == [4]
    assert CheckpointManager(tmp_path, keep_last=1, save_every=2).config == cfg
    with pytest.raises(ConfigError, match="either as a ManagerConfig or as keywords, not both"):
        CheckpointManager(tmp_path, config=cfg, keep_last=2)
    with pytest.raises(ConfigError, match="give a unickpt.ManagerConfig"):
        CheckpointManager(tmp_path, config={"keep_last": 1})


def test_run_root_describe_scan_and_moves(tmp_path):
    from unickpt.manager import RunRoot

    with CheckpointManager(tmp_path) as m:
        for s in (1, 2):
            m.save(s, {"w": np.arange(4.0)}, metrics={"loss": float(s)})
    rr = RunRoot(str(tmp_path))
    assert rr.path == str(tmp_path) and rr.scan().steps == (1, 2)
    d = rr.describe(2)
    assert (d.step, d.path, d.metrics) == (2, str(tmp_path / "step_2"), {"loss": 2.0})
    assert d.size == sum(f.stat().st_size for f in (tmp_path / "step_2").iterdir())
    assert [c.step for c in rr.checkpoints()] == [1, 2] and rr.latest().step == 2
    (tmp_path / "run_1" / "step_1").mkdir(parents=True)
    with pytest.raises(unickpt.CheckpointExistsError, match="destination exists") as ei:
        rr.archive([1], 1)
    assert isinstance(ei.value, FileExistsError)
    rr.delete([1])
    assert rr.scan().steps == (2,) and not [n for n in os.listdir(tmp_path) if "trash" in n]
