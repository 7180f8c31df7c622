"""assert_resume_deterministic: the runner itself (schedules, shrinking, errors, hard kill)."""

from __future__ import annotations

import os
import random
import time

import numpy as np
import pytest

import unickpt
from unickpt.testing import ResumeMismatchError, assert_resume_deterministic
from unickpt.testing.hardkill import KillOutcome, run_and_kill


def _latest(root):
    steps = [int(n[5:]) for n in os.listdir(root) if n.startswith("step_")
             and os.path.exists(os.path.join(root, n, "manifest.msgpack"))]
    return max(steps) if steps else None


def zero_padded_train(root, total_steps, stop_at=None):
    for s in range(1, total_steps + 1):
        unickpt.save(os.path.join(root, f"step_{s:02d}"), {"step": s})
    return {"step": total_steps}


def counter_train(root, total_steps, stop_at=None, *, save_every=2, final_save=True,
                  forget_on_second_resume=False):
    """x_{t} = x_{t-1} / 2 + t, plus a shuffled data position; saves every ``save_every``."""
    latest = _latest(root)
    state = {"x": np.zeros(2), "pos": 0, "step": 0, "resumes": 0}
    if latest is not None:
        ck = unickpt.load(f"{root}/step_{latest}")
        state = {**ck, "resumes": ck["resumes"] + 1}
        if forget_on_second_resume and ck["resumes"] >= 1:
            state["pos"] = 0  # a bug that needs two interruptions to show
    for step in range(state["step"] + 1, total_steps + 1):
        state = {**state, "x": state["x"] / 2 + step + state["pos"], "pos": (state["pos"] + 3) % 7,
                 "step": step}
        if step == stop_at:
            break
        if ((step % save_every == 0) or (final_save and step == total_steps)) and step != latest:
            unickpt.save(f"{root}/step_{step}", state)
    return {k: v for k, v in state.items() if k != "resumes"}


def twice_buggy_train(root, total_steps, stop_at=None):
    return counter_train(root, total_steps, stop_at, forget_on_second_resume=True)


def sparse_train(root, total_steps, stop_at=None):
    return counter_train(root, total_steps, stop_at, save_every=4, final_save=False)


def crashing_train(root, total_steps, stop_at=None):
    if _latest(root) is not None:
        raise RuntimeError("cannot parse the checkpoint")
    return counter_train(root, total_steps, stop_at)


def spawning_train(root, total_steps, stop_at=None):
    import subprocess
    import sys

    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.path.join(root, "helper.pid"), "w") as f:
        f.write(str(helper.pid))
    return counter_train(root, total_steps, stop_at)


def hanging_train(root, total_steps, stop_at=None):
    time.sleep(60)


def failing_train(root, total_steps, stop_at=None):
    if os.getpid() != int(os.environ.get("TEST_PARENT_PID", "0")):  # fail in the child only
        raise SystemExit("no GPU found")
    return counter_train(root, total_steps, stop_at)


def test_explicit_schedules_run_in_order_and_are_returned():
    seen = []

    def spy(root, total_steps, stop_at=None):
        seen.append(stop_at)
        return counter_train(root, total_steps, stop_at)

    assert assert_resume_deterministic(spy, 8, interruptions=[3, (2, 5, 8)]) == [(3,), (2, 5, 8)]
    # reference, its determinism re-run, then each schedule's stops and its final run
    assert seen == [None, None, 3, None, 2, 5, 8, None]


def test_a_bug_needing_two_interruptions_is_found_and_shrunk():
    assert_resume_deterministic(twice_buggy_train, 8, interruptions=[3, 6, (2, 5)])
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic(twice_buggy_train, 8, max_examples=30)
    # Minimal: stop after 3 (resume from step_2), a save at 4 by the resumed run, stop after 5.
    assert e.value.schedule == (3, 5), str(e.value)
    assert "pos" in e.value.paths
    assert "reproduce with interruptions=[(3, 5)]" in str(e.value)


def test_a_nondeterministic_trainer_is_reported_as_such():
    def noisy(root, total_steps, stop_at=None):
        return {"x": np.float64(time.perf_counter_ns())}

    with pytest.raises(ResumeMismatchError, match=r"(?s)train is not deterministic even "
                       r"without interruptions.*x: float64\[\]: 1 of 1 elements differ"):
        assert_resume_deterministic(noisy, 4, interruptions=[2])


def test_a_difference_in_the_first_call_only_is_not_taken_for_nondeterminism():
    calls = []

    def warming_up(root, total_steps, stop_at=None):
        # e.g. a lazy import drawing from a global RNG during the first call in a process
        calls.append(stop_at)
        out = counter_train(root, total_steps, stop_at)
        return {**out, "x": out["x"] + 1} if len(calls) == 1 else out

    assert assert_resume_deterministic(warming_up, 6, interruptions=[3]) == [(3,)]
    assert calls == [None, None, None, 3, None]  # three reference runs, then the schedule


def test_global_rngs_are_fresh_for_each_run_and_restored_after():
    def unseeded(root, total_steps, stop_at=None):
        return {"draw": np.random.random_sample(2)}

    random.seed(5)
    np.random.seed(5)
    before = (random.random(), np.random.random_sample())
    random.seed(5)
    np.random.seed(5)
    with pytest.raises(ResumeMismatchError, match="not deterministic even without"):
        assert_resume_deterministic(unseeded, 4, interruptions=[2])
    assert (random.random(), np.random.random_sample()) == before


def test_a_crash_while_resuming_is_reported_with_its_traceback():
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic(crashing_train, 6, interruptions=[(3,)])
    msg = str(e.value)
    assert msg.startswith("resuming failed: interrupted after step(s) [3] of 6, a run raised "
                          "RuntimeError.")
    assert "The run raised RuntimeError: cannot parse the checkpoint" in msg
    assert 'in crashing_train\n    raise RuntimeError("cannot parse the checkpoint")' in msg
    assert isinstance(e.value.__cause__, RuntimeError) and e.value.differences == []


@pytest.mark.parametrize("kwargs, message", [
    ({"interruptions": [(3, 3)]}, r"\(3, 3\): steps must strictly increase"),
    ({"interruptions": [0]}, r"schedule 0: steps must lie in 1..6"),
    ({"interruptions": [7]}, r"schedule 7: steps must lie in 1..6"),
    ({"interruptions": [()]}, r"expected a step or a non-empty sequence"),
    ({"hard_kill": "sometimes"}, r"hard_kill='sometimes': expected False, True or one of "
                                 r"\('after_save', 'mid_save', 'torn_write'\)"),
])
def test_bad_arguments_are_rejected_before_any_run(kwargs, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        assert_resume_deterministic(lambda *a, **k: calls.append(a), 6, **kwargs)
    assert calls == []
    with pytest.raises(ValueError, match="total_steps must be a positive int, got 0"):
        assert_resume_deterministic(counter_train, 0)


def test_hard_kill_needs_an_importable_train():
    with pytest.raises(ValueError, match=r"hard_kill needs a train function a subprocess can "
                                         r"import, got <function .*<lambda>"):
        assert_resume_deterministic(lambda r, n, stop_at=None: {}, 4, hard_kill=True)
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod' of train"):
        assert_resume_deterministic("no_such_mod:train", 4, hard_kill=True)
    with pytest.raises(ValueError, match="module 'test_testing_resume' has no attribute 'nope'"):
        assert_resume_deterministic("test_testing_resume:nope", 4, hard_kill=True)


def test_hard_kill_moments_leave_the_disk_as_a_crash_would(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    out = run_and_kill("test_testing_resume:counter_train", str(root), 8, 3, "mid_save")
    assert out == KillOutcome(True, 4, "mid_save")
    names = sorted(os.listdir(root))
    # step_2 committed; step_4 fully written into its temporary directory, never renamed
    assert names[0] == ".unickpt-tmp.step_4." + names[0].split("step_4.", 1)[1]
    assert names[1:] == ["step_2"]
    assert sorted(os.listdir(root / names[0])) == ["arrays.safetensors", "manifest.msgpack"]
    out = run_and_kill("test_testing_resume:counter_train", str(root), 8, 5, "after_save")
    assert out == KillOutcome(True, 6, "after_save")
    assert unickpt.load(root / "step_6")["step"] == 6
    assert not (root / "step_8").exists()


def test_hard_kill_torn_write_leaves_a_half_written_data_file(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    out = run_and_kill("test_testing_resume:counter_train", str(root), 8, 3, "torn_write")
    assert out == KillOutcome(True, 4, "torn_write")
    assert "in the middle of a write into step_4's data file" in out.describe(3)
    names = sorted(os.listdir(root))
    assert names[1:] == ["step_2"] and names[0].startswith(".unickpt-tmp.step_4.")
    # killed inside the data file: no manifest yet, and the file is not what a save writes
    assert sorted(os.listdir(root / names[0])) == ["arrays.safetensors"]
    torn = (root / names[0] / "arrays.safetensors").read_bytes()
    unickpt.save(tmp_path / "whole", unickpt.load(root / "step_2") | {"step": 4})
    assert torn != (tmp_path / "whole" / "arrays.safetensors").read_bytes()
    with unickpt.CheckpointManager(root) as m:
        assert m.resolve_start().step == 2
    assert [n for n in os.listdir(root) if n.startswith(".unickpt-tmp.")] == []


def test_hard_kill_torn_write_resumes_deterministically():
    tried = assert_resume_deterministic(counter_train, 6, interruptions=[3], hard_kill="torn_write")
    assert tried


def test_hard_kill_step_names_with_leading_zeros_are_not_checkpoints(tmp_path):
    # a save to step_04 is not a checkpoint of step 4 (the policy's parser): no kill
    out = run_and_kill("test_testing_resume:zero_padded_train", str(tmp_path), 4, 1,
                       "mid_save")
    assert out == KillOutcome(False, None, "mid_save")


def test_hard_kill_takes_the_childs_own_children_with_it(tmp_path):
    out = run_and_kill("test_testing_resume:spawning_train", str(tmp_path), 6, 2, "after_save")
    assert out == KillOutcome(True, 2, "after_save")
    pid = int((tmp_path / "helper.pid").read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):  # dead, waiting to be reaped by init
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the trainer's helper process {pid} survived the kill")


def test_hard_kill_reports_a_run_that_finished_before_the_kill_point():
    tried = assert_resume_deterministic(sparse_train, 10, interruptions=[9], hard_kill=True)
    assert tried == [(9,)]
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic("test_testing_resume:twice_buggy_train", 8,
                                    interruptions=[(3, 5)], hard_kill="after_save")
    assert e.value.events == ["SIGKILL right after step_4 was committed",
                              "SIGKILL right after step_6 was committed",
                              "resumed and trained to step 8"]


def test_hard_kill_child_failures_and_timeouts_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_PARENT_PID", str(os.getpid()))
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic("test_testing_resume:failing_train", 4,
                                    interruptions=[2], hard_kill=True, check_reference=False)
    assert "no GPU found" in str(e.value)
    msg = str(e.value.__cause__)
    assert msg.startswith("hard-kill run of test_testing_resume:failing_train failed on its own "
                          "(exit code 1) before the kill point; output:")
    assert msg.rstrip().endswith("no GPU found")
    with pytest.raises(RuntimeError, match=r"did not reach the save of a step >= 2 within 1 s"):
        run_and_kill("test_testing_resume:hanging_train", str(tmp_path), 4, 2, "after_save",
                     timeout=1.0)


def test_without_hypothesis_only_the_hypothesis_driven_check_is_unavailable():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['hypothesis'] = None  # as if not installed\n"
        "import numpy as np\n"
        "from unickpt.testing import assert_trees_equal, assert_resume_deterministic\n"
        "assert_trees_equal({'a': np.ones(2)}, {'a': np.ones(2)})\n"
        "def train(root, n, stop_at=None):\n"
        "    return {'n': n}\n"
        "assert assert_resume_deterministic(train, 3, interruptions=[1]) == [(1,)]\n"
        "try:\n"
        "    assert_resume_deterministic(train, 3)\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == (
        "unickpt.testing needs hypothesis for resume checks and strategies; install it with "
        "`pip install unickpt[test]` (or `pip install hypothesis`)")


def _sampler_bug_train(root, total_steps, stop_at=None):
    """The data order comes from a sampler that is not in the state (the bug); a scheduler
    counter reacts to the weights only at the last step, so it differs only at the end."""
    data = np.random.default_rng(0).random((8, 3)).astype(np.float32)
    sampler = np.random.default_rng(1)  # restarts from its seed on resume
    done = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_"))
    state = (unickpt.load(f"{root}/step_{done[-1]}") if done else
             {"w": np.zeros(3, np.float32), "step": 0, "sched": {"last_epoch": 0}})
    for step in range(state["step"] + 1, total_steps + 1):
        w = state["w"] * np.float32(0.9) + data[sampler.integers(8)]
        last = state["sched"]["last_epoch"]
        if step == total_steps:
            last += int(w.view(np.uint32).sum() % 1000)
        state = {"w": w, "step": step, "sched": {"last_epoch": last}}
        if step == stop_at:
            return state
        if step % 2 == 0:
            unickpt.save(f"{root}/step_{step}", state, overwrite=True)
    return state


def test_culprits_are_ranked_by_the_earliest_divergence_in_time():
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic(_sampler_bug_train, 10, interruptions=[3])
    assert set(e.value.paths) == {"w", "sched/last_epoch"}  # both differ at the end
    line = next(ln for ln in str(e.value).splitlines() if ln.startswith("Likely culprits"))
    # The counter differs only at step 10; the weights already in the checkpoints of step 4.
    assert line == ("Likely culprits (the leaves that differ first in time, in the checkpoints "
                    "of step 4; integer state such as counters, data positions and RNG states "
                    "never drifts by rounding; one that differs was not saved or not "
                    "restored): w")


def test_first_divergence_finds_the_earliest_differing_checkpoint(tmp_path):
    from unickpt.testing.resume import first_divergence

    a, b = tmp_path / "a", tmp_path / "b"
    for step in (2, 4, 6):
        unickpt.save(a / f"step_{step}", {"n": step, "x": np.float32([step])})
        unickpt.save(b / f"step_{step}", {"n": step + (step >= 6), "x": np.float32([step])})
    (b / "step_8").mkdir()  # only in one root: not compared
    step, diffs = first_divergence(a, b)
    assert step == 6 and [d.path for d in diffs] == ["n"]
    assert first_divergence(a, a) is None
    assert first_divergence(a, tmp_path / "missing") is None
