"""Property tests of the policy layer, pure and through a real CheckpointManager.

Random histories of saves (with and without metrics), crashes (leftover temp dirs of dead
writers, stray uncommitted step dirs) and restarts show: resume picks the newest committed
checkpoint; retention keeps exactly what the rules say; archives are numbered as specified
and move nothing uncommitted; resolve_start is idempotent.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unickpt import CheckpointExistsError, CheckpointManager, CheckpointNotFoundError
from unickpt.policy import (
    Listing,
    classify,
    format_run,
    format_step,
    next_run,
    parse_run,
    parse_step,
    plan_start,
    retain,
    should_save,
    to_delete,
)
from unickpt.storage import host_tag

steps_st = st.lists(st.integers(0, 10**6), max_size=30, unique=True)
metric_st = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                      st.integers(-5, 5), st.just("n/a"))


# ---------------------------------------------------------------- naming
@given(st.integers(0, 10**30))
def test_step_names_round_trip(n):
    assert parse_step(format_step(n)) == n
    assert parse_run(format_run(n)) == n


@given(st.text(max_size=12))
def test_only_canonical_names_parse(name):
    s = parse_step(name)
    if s is not None:
        assert format_step(s) == name
    r = parse_run(name)
    if r is not None:
        assert format_run(r) == name


@given(steps_st, steps_st, st.lists(st.integers(0, 50), unique=True, max_size=5),
       st.lists(st.sampled_from([".unickpt-tmp.step_3.h.1.abcd1234", ".unickpt-trash.x",
                                 "latest", ".unickpt.lock", "step_01", "notes.txt"]),
                unique=True))
def test_classify_and_resume_newest_committed(committed, uncommitted, runs, extra):
    uncommitted = [s for s in uncommitted if s not in committed]
    names = ([format_step(s) for s in committed + uncommitted]
             + [format_run(r) for r in runs] + extra)
    listing = classify(names, {format_step(s) for s in committed})
    assert listing.steps == tuple(sorted(committed))
    assert listing.runs == tuple(sorted(runs))
    assert {parse_step(n) for n in listing.uncommitted} == set(uncommitted)
    plan = plan_start("auto", listing)
    if committed:
        assert (plan.resume, plan.step, plan.name) == (True, max(committed),
                                                       format_step(max(committed)))
    else:
        assert (plan.resume, plan.step, plan.name) == (False, 0, None)
        with pytest.raises(CheckpointNotFoundError):
            plan_start("must", listing)
    assert plan.archive == ()


@given(steps_st, st.lists(st.integers(0, 10**4), unique=True, max_size=6))
def test_archive_plan(committed, runs):
    listing = Listing(steps=tuple(sorted(committed)), runs=tuple(sorted(runs)))
    plan = plan_start("never", listing)
    assert not plan.resume and plan.step == 0
    assert plan.archive == tuple(sorted(committed))
    if committed:
        assert plan.archive_run == (max(runs) + 1 if runs else 1)
        assert plan.archive_run not in runs
    else:
        assert plan.archive_run is None
    if committed:
        with pytest.raises(CheckpointExistsError, match="on_existing='error'"):
            plan_start("never", listing, on_existing="error")


@given(steps_st.filter(bool), st.data())
def test_explicit_step_displaces_only_newer(committed, data):
    chosen = data.draw(st.sampled_from(sorted(committed)))
    plan = plan_start(chosen, Listing(steps=tuple(sorted(committed))))
    assert plan.resume and plan.step == chosen
    assert plan.archive == tuple(s for s in sorted(committed) if s > chosen)


def test_next_run_respects_gaps():
    assert next_run([2, 10]) == 11 and next_run([]) == 1 and next_run([0]) == 1


# ---------------------------------------------------------------- schedule
@given(st.integers(0, 1000), st.one_of(st.none(), st.integers(1, 50)),
       st.one_of(st.none(), st.floats(0.1, 100)), st.booleans(), st.floats(0, 200),
       st.lists(st.integers(0, 1000), max_size=5))
def test_schedule(step, every, seconds, force, elapsed, existing):
    d = should_save(step, save_every=every, save_every_seconds=seconds, force=force,
                    now=1000.0 + elapsed, last_save_time=1000.0, existing=existing)
    if step in existing:
        assert not d.save  # the same step is never written twice
        return
    expected = (force or (every is None and seconds is None)
                or (every is not None and step % every == 0)
                or (seconds is not None and (1000.0 + elapsed) - 1000.0 >= seconds))
    assert d.save == expected


# ---------------------------------------------------------------- retention
def oracle(steps, metrics, *, keep_last, keep_every, keep_best, best_metric, best_mode,
           protected):
    """Retention written independently: by counting, not by sorting."""
    steps = sorted(set(steps))
    kept = set()
    if not steps:
        return kept
    kept.add(max(steps))
    kept |= set(protected) & set(steps)
    if keep_last is None and keep_every is None and keep_best is None:
        kept |= set(steps)
    for s in steps:
        if keep_last and sum(t > s for t in steps) < keep_last:
            kept.add(s)
        if keep_every and s % keep_every == 0:
            kept.add(s)

    def value(s):
        v = (metrics.get(s) or {}).get(best_metric)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
        return (v if best_mode == "min" else -v) if ok else None

    if keep_best:
        for s in steps:
            v = value(s)
            if v is None:
                continue  # the missing-metric rule: never a keep_best candidate
            better = sum(1 for t in steps if value(t) is not None
                         and (value(t) < v or (value(t) == v and t > s)))
            if better < keep_best:
                kept.add(s)
    return kept


retention_opts = st.fixed_dictionaries({
    "keep_last": st.one_of(st.none(), st.integers(1, 5)),
    "keep_every": st.one_of(st.none(), st.integers(1, 7)),
    "keep_best": st.one_of(st.none(), st.integers(1, 4)),
    "best_mode": st.sampled_from(["min", "max"]),
})


@given(steps_st, st.data(), retention_opts)
def test_retention_keeps_exactly_what_the_rules_say(steps, data, opts):
    metrics = {s: {"loss": data.draw(metric_st)} for s in steps}
    metrics = {s: ({} if m["loss"] is None else m) for s, m in metrics.items()}
    protected = data.draw(st.lists(st.sampled_from(steps), max_size=1)) if steps else []
    opts = dict(opts, best_metric="loss" if opts["keep_best"] else None, protected=protected)
    kept = retain(steps, metrics, **opts)
    assert set(kept) == set(steps)
    survivors = {s for s, r in kept.items() if r}
    assert survivors == oracle(steps, metrics, **opts)
    assert set(to_delete(kept)) == set(steps) - survivors
    if steps:
        assert "newest" in kept[max(steps)]
        for p in protected:
            assert "resumed" in kept[p]


# ---------------------------------------------------------------- through the manager
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


DEAD_PID = _dead_pid()

session_st = st.fixed_dictionaries({
    "mode": st.sampled_from(["auto", "auto", "auto", "never"]),
    "saves": st.lists(st.tuples(st.integers(1, 3), metric_st), max_size=4),
    "crash": st.booleans(),  # leave a temp dir of a dead writer (a save killed midway)
    "stray": st.booleans(),  # an uncommitted step dir with a huge step number
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(session_st, min_size=1, max_size=4), retention_opts)
def test_random_histories_through_the_manager(sessions, opts):
    best = "loss" if opts["keep_best"] else None
    with tempfile.TemporaryDirectory() as root:
        committed: dict[int, object] = {}  # model: step -> metric
        runs: dict[int, set[int]] = {}
        stray: set[int] = set()
        last = 0
        for sess in sessions:
            m = CheckpointManager(root, resume=sess["mode"], best_metric=best, **opts)
            d = m.resolve_start()
            assert m.resolve_start() is d  # idempotent
            resumed = None
            if sess["mode"] == "auto" and committed:
                resumed = max(committed)
                assert (d.resume, d.step, d.path) == (True, resumed,
                                                      os.path.join(root, format_step(resumed)))
            else:
                assert (d.resume, d.step, d.path) == (False, 0, None)
            if sess["mode"] == "never" and committed:
                k = max(runs) + 1 if runs else 1
                assert d.archived_to == os.path.join(root, format_run(k))
                runs[k] = set(committed)
                committed = {}
            else:
                assert d.archived_to is None
            for inc, metric in sess["saves"]:
                last += inc
                metrics = {} if metric is None else {"loss": metric}
                if isinstance(metric, str):
                    metrics = {"note_only": 1}
                assert m.save(last, {"x": np.array([last])}, metrics=metrics)
                committed[last] = metrics
                kept = retain(sorted(committed), {s: committed[s] for s in committed},
                              best_metric=best,  # resumed: protected until a newer commit
                              protected=[resumed] if resumed and resumed >= last else [],
                              **opts)
                committed = {s: committed[s] for s, r in kept.items() if r}
            m.close()
            if sess["crash"]:
                os.mkdir(os.path.join(root, f".unickpt-tmp.step_{last + 1}.{host_tag()}."
                                            f"{DEAD_PID}.abcd1234"))
            if sess["stray"]:
                s = 10**9 + len(stray)
                os.mkdir(os.path.join(root, format_step(s)))
                stray.add(s)
            entries = os.listdir(root)
            on_disk = {parse_step(n) for n in entries if parse_step(n) is not None} - stray
            assert on_disk == set(committed)
            for k, moved in runs.items():
                assert {parse_step(n) for n in os.listdir(os.path.join(root, format_run(k)))} \
                    == moved  # nothing uncommitted moved
            for s in stray:
                assert os.path.isdir(os.path.join(root, format_step(s)))
            lookup = CheckpointManager(root)
            assert [c.step for c in lookup.checkpoints()] == sorted(committed)
            assert (lookup.latest().step if committed else None) == \
                (max(committed) if committed else None)
        # a fresh start removes the dead writer's temp and resumes the newest committed
        with CheckpointManager(root) as m:
            d = m.resolve_start()
            assert d.step == (max(committed) if committed else 0)
        assert not [n for n in os.listdir(root) if n.startswith(".unickpt-tmp.")]
