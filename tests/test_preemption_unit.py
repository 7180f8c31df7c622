"""Preemption in one process: options, handlers (chaining, restoring), the save it forces, the
grace budget, and the rank agreement against a fake in-process coordinator of thread "ranks"."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import unickpt
from unickpt import CheckpointManager, ConfigError, UnickptError
from unickpt.manager.preemption import Agreement


# ---------------------------------------------------------------- a fake coordinator
class Group:
    """What a 2-rank job shares: one slot per rank and a barrier."""

    def __init__(self, n: int = 2):
        self.n = n
        self.slots: list = [None] * n
        self.barrier = threading.Barrier(n)
        self.calls = 0
        self.timeouts: list[float] = []


class FakeCoordinator:
    """``all_gather`` over threads; objects travel as JSON, as over a real wire."""

    def __init__(self, group: Group, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.n

    def all_gather(self, obj: object, timeout: float) -> list:
        g = self.group
        g.slots[self.rank] = json.dumps(obj)
        g.barrier.wait(timeout)
        out = [json.loads(s) for s in g.slots]
        if self.rank == 0:
            g.calls += 1
            g.timeouts.append(timeout)
        g.barrier.wait(timeout)
        return out


def run_ranks(fn, n: int = 2) -> list:
    """``fn(rank, coordinator)`` in one thread per rank; their results, errors re-raised."""
    group = Group(n)
    results: list = [None] * n
    errors: list = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, FakeCoordinator(group, rank))
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    return results


def first_agreed(agreement: Agreement, flag_from: int | None, steps: range) -> int | None:
    for step in steps:
        if agreement.agree(flag_from is not None and step >= flag_from, step):
            return step
    return None


# ---------------------------------------------------------------- agreement
@settings(max_examples=30, deadline=None)
@given(signal_at=st.integers(1, 60), who=st.integers(0, 1), every=st.integers(1, 9))
def test_any_ranks_flag_makes_every_rank_save_the_same_step(signal_at: int, who: int,
                                                            every: int) -> None:
    def rank(r: int, coord: FakeCoordinator) -> tuple[int | None, int]:
        a = Agreement(coord, every_steps=every, every_seconds=None)
        return first_agreed(a, signal_at if r == who else None, range(1, 80)), a.checks

    (s0, c0), (s1, c1) = run_ranks(rank)
    checks = range(1, 80, every)  # the first call checks, then every `every` steps
    expected = next(s for s in checks if s >= signal_at)
    assert s0 == s1 == expected  # the same step on both ranks, within one interval
    assert expected - signal_at < every
    assert c0 == c1 == len([s for s in checks if s <= expected])  # one collective per check


def test_seconds_become_a_step_interval_every_rank_computes_alike() -> None:
    paces = (0.1, 0.25)  # seconds per step on rank 0 and rank 1

    def rank(r: int, coord: FakeCoordinator) -> list[int]:
        t = [0.0]
        a = Agreement(coord, every_steps=None, every_seconds=1.0, clock=lambda: t[0])
        checked = []
        for step in range(1, 40):
            t[0] = step * paces[r]
            before = a.checks
            a.agree(False, step)
            if a.checks > before:
                checked.append(step)
        return checked

    c0, c1 = run_ranks(rank)
    # steps 1 and 2 measure the pace; then every floor(1.0 / fastest pace) = 10 steps
    assert c0 == c1 == [1, 2, 12, 22, 32]


def test_steps_and_seconds_together_check_at_whichever_comes_first() -> None:
    def rank(r: int, coord: FakeCoordinator) -> int:
        t = [0.0]
        a = Agreement(coord, every_steps=3, every_seconds=100.0, clock=lambda: t[0])
        for step in range(1, 11):
            t[0] = step * 0.1
            a.agree(False, step)
        return a.checks

    assert run_ranks(rank) == [4, 4]  # steps 1, 4, 7, 10


def test_the_agreement_passes_its_timeout_and_sends_plain_values() -> None:
    def rank(r: int, coord: FakeCoordinator) -> bool:
        return Agreement(coord, timeout=12.5).agree(r == 1, 3)

    group_seen: list = []

    def wrapped(r: int, coord: FakeCoordinator) -> bool:
        group_seen.append(coord.group)
        return rank(r, coord)

    assert run_ranks(wrapped) == [True, True]
    assert group_seen[0].timeouts == [12.5]
    assert [json.loads(s) for s in group_seen[0].slots] == [
        {"flag": False, "step": 3, "pace": None}, {"flag": True, "step": 3, "pace": None}]


def test_ranks_at_different_steps_are_an_error_naming_them() -> None:
    def rank(r: int, coord: FakeCoordinator) -> bool:
        return Agreement(coord).agree(False, 10 + r)

    with pytest.raises(UnickptError, match=r"different steps \[10, 11\]; every rank must call"):
        run_ranks(rank)


def test_single_process_is_the_local_flag_without_a_collective() -> None:
    class One:
        world_size = 1

        def all_gather(self, obj: object, timeout: float) -> list:
            raise AssertionError("no collective in a world of one")

    for coord in (None, One()):
        a = Agreement(coord, every_steps=100)
        assert [a.agree(s >= 3, s) for s in range(1, 6)] == [False, False, True, True, True]


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("opts, msg", [
    ({"preemption_signals": ["SIGTERM"]}, "preemption_signals is only used with preemption=True"),
    ({"preemption": True, "preemption_signals": ["SIGKILL"]}, "SIGKILL cannot be caught"),
    ({"preemption": True, "preemption_signals": ["NOPE"]}, "'NOPE' is not a signal"),
    ({"preemption": True, "preemption_signals": "SIGTERM"}, "use a non-empty list"),
    ({"preemption": True, "preemption_signals": []}, "use a non-empty list"),
    ({"preemption": "yes"}, "preemption='yes' is not allowed; use True or False"),
    ({"preemption_grace_seconds": 0}, "preemption_grace_seconds=0 is not allowed"),
    ({"preemption_check_every_steps": 0}, "preemption_check_every_steps=0 is not allowed"),
    ({"preemption_check_every_seconds": -1.0}, "preemption_check_every_seconds=-1.0 is not"),
])
def test_bad_preemption_options_are_config_errors(opts: dict, msg: str, tmp_path) -> None:
    with pytest.raises(ConfigError, match=msg):
        CheckpointManager(tmp_path / "r", **opts)
    assert not (tmp_path / "r").exists()


def test_signals_are_normalized_and_default_to_term_and_usr1() -> None:
    cfg = unickpt.ManagerConfig(preemption=True, preemption_signals=("TERM", 15, signal.SIGUSR2))
    assert cfg.preemption_signals == (signal.SIGTERM, signal.SIGUSR2)
    assert unickpt.ManagerConfig(preemption=True).preemption_signals == (signal.SIGTERM,
                                                                         signal.SIGUSR1)
    assert unickpt.ManagerConfig().preemption_signals is None


# ---------------------------------------------------------------- handlers
def test_handlers_chain_to_the_previous_one_and_are_restored_on_close(tmp_path) -> None:
    seen: list[int] = []

    def previous(signum: int, frame: object) -> None:
        seen.append(signum)

    old_term = signal.signal(signal.SIGTERM, previous)
    old_usr1 = signal.getsignal(signal.SIGUSR1)
    try:
        mgr = CheckpointManager(tmp_path, preemption=True)
        assert signal.getsignal(signal.SIGTERM) is not previous
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM] and mgr._preemption.flag.count == 1
        mgr.close()
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGUSR1) == old_usr1
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM] * 2 and mgr._preemption.flag.count == 1
    finally:
        signal.signal(signal.SIGTERM, old_term)


def test_managers_closed_out_of_order_keep_the_chain_whole(tmp_path) -> None:
    seen: list[int] = []
    old = signal.signal(signal.SIGUSR2, lambda n, f: seen.append(n))
    try:
        a = CheckpointManager(tmp_path / "a", preemption=True, preemption_signals=["USR2"])
        b = CheckpointManager(tmp_path / "b", preemption=True, preemption_signals=["USR2"])
        a.close()  # b's handler is installed: a's stays in b's chain
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2] and b._preemption.flag.count == 1
        b.close()
        # b put back what it replaced (a's handler, which still chains to the original)
        assert signal.getsignal(signal.SIGUSR2) == a._preemption.flag._handle
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2] * 2
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_a_dropped_manager_restores_its_handlers(tmp_path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    mgr = CheckpointManager(tmp_path, preemption=True)
    assert signal.getsignal(signal.SIGTERM) is not before
    del mgr
    import gc

    gc.collect()
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigint_by_name_does_not_raise_keyboard_interrupt_mid_save(tmp_path) -> None:
    # Python's own handler, whatever this process inherited (a job started in the background
    # by a shell inherits SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with CheckpointManager(tmp_path, preemption=True, preemption_signals=["SIGINT"]) as mgr:
            os.kill(os.getpid(), signal.SIGINT)  # the default would raise KeyboardInterrupt
            assert mgr.save(3, {"w": np.ones(2)}) and mgr.preempted
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_a_manager_built_off_the_main_thread_is_a_config_error(tmp_path) -> None:
    out: list = []
    before = signal.getsignal(signal.SIGTERM)

    def build() -> None:
        try:
            CheckpointManager(tmp_path, preemption=True)
        except ConfigError as e:
            out.append(e)

    t = threading.Thread(target=build, name="worker-7")
    t.start()
    t.join(30)
    assert len(out) == 1
    assert "thread 'worker-7'" in str(out[0]) and "only be installed from the main thread" \
        in str(out[0])
    assert signal.getsignal(signal.SIGTERM) is before


def test_disabled_manager_installs_nothing(tmp_path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with CheckpointManager(tmp_path, preemption=True, enabled=False) as mgr:
        assert signal.getsignal(signal.SIGTERM) is before and not mgr.preempted


# ---------------------------------------------------------------- the forced save
@pytest.mark.parametrize("async_save", [False, True])
def test_the_next_save_after_a_signal_saves_off_schedule_and_commits(tmp_path,
                                                                    async_save: bool) -> None:
    with CheckpointManager(tmp_path, preemption=True, save_every=10,
                           async_save=async_save) as mgr:
        assert not mgr.save(3, {"w": np.full(2, 3.0)}) and not mgr.preempted
        os.kill(os.getpid(), signal.SIGUSR1)
        assert not mgr.preempted  # only a save sets it
        assert mgr.save(4, {"w": np.full(2, 4.0)})
        assert mgr.preempted and mgr._preemption.saved_step == 4
        assert [c.step for c in mgr.checkpoints()] == [4]  # committed, not just started
        assert not mgr.save(5, {"w": np.full(2, 5.0)})  # back on the schedule
    assert unickpt.load(str(tmp_path / "step_4"))["w"].tolist() == [4.0, 4.0]


def test_a_signal_on_an_already_saved_step_waits_for_it_without_a_new_save(tmp_path) -> None:
    with CheckpointManager(tmp_path, preemption=True, save_every=5, async_save=True) as mgr:
        assert mgr.save(5, {"w": np.ones(2)})
        os.kill(os.getpid(), signal.SIGTERM)
        assert not mgr.save(5, {"w": np.ones(2)})  # no rewrite...
        assert mgr.preempted and [c.step for c in mgr.checkpoints()] == [5]  # ...committed


def test_two_ranks_save_the_same_step_when_only_rank_1_is_signalled(tmp_path) -> None:
    mgrs = [CheckpointManager(tmp_path / f"rank{r}", preemption=True, save_every=100,
                              preemption_check_every_steps=3,
                              preemption_check_every_seconds=None) for r in range(2)]
    try:
        def rank(r: int, coord: FakeCoordinator) -> int | None:
            m = mgrs[r]
            m._preemption.agreement.coordinator = coord  # what the integration wires
            for step in range(1, 30):
                if r == 1 and step == 8:
                    m._preemption.flag.count += 1  # the signal, seen by rank 1 only
                m.save(step, {"w": np.full(2, float(step))})
                if m.preempted:
                    return step
            return None

        assert run_ranks(rank) == [10, 10]  # checks at 1, 4, 7, 10
        assert [[c.step for c in m.checkpoints()] for m in mgrs] == [[10], [10]]
    finally:
        for m in mgrs:
            m.close()


# ---------------------------------------------------------------- grace budget
def test_saves_slower_than_the_grace_period_are_logged_with_figures(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, "unickpt")
    with CheckpointManager(tmp_path, preemption=True, preemption_grace_seconds=1e-9) as mgr:
        mgr.restore({"w": np.zeros(2)})
        assert not caplog.records  # nothing measured yet
        mgr.save(1, {"w": np.ones(2)})
        os.kill(os.getpid(), signal.SIGTERM)
        mgr.save(2, {"w": np.ones(2)})
    msgs = [r.getMessage() for r in caplog.records]
    assert any("preemption save of step 2: recent saves took up to" in m
               and "more than preemption_grace_seconds=1e-09s" in m for m in msgs), msgs
    assert any("step_2 is committed" in m and "after the signal (grace 1e-09s)" in m
               for m in msgs), msgs
    caplog.clear()
    with CheckpointManager(tmp_path, preemption=True, preemption_grace_seconds=1e-9) as mgr:
        mgr.restore({"w": np.zeros(2)})  # the resumed checkpoint's recorded save time
    (msg,) = [r.getMessage() for r in caplog.records]
    assert ": at start: recent saves took up to" in msg and "(last " in msg


def test_fast_saves_log_no_budget_warning(tmp_path, caplog) -> None:
    caplog.set_level(logging.WARNING, "unickpt")
    with CheckpointManager(tmp_path, preemption=True, preemption_grace_seconds=600) as mgr:
        mgr.save(1, {"w": np.ones(2)})
        os.kill(os.getpid(), signal.SIGTERM)
        mgr.save(2, {"w": np.ones(2)})
    assert not [r for r in caplog.records if "grace_seconds" in r.getMessage()]
