"""Crash and disk-full injection at every I/O call (issue 18 harness; rows 1 and 14).

CI runs a fixed-seed sample of the calls of each scenario (``UNICKPT_CRASH_POINTS=all`` or a
number scales it); the two scenarios behind rows 1 and 14 always run every call.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from unickpt.testing.crash import (
    SCENARIOS,
    default_points,
    sweep_isolated,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

FULL = {"archive", "overwrite_no_exchange"}  # rows 14 and 1: every call, always


def _assert(rep) -> None:
    assert rep.points > 0 and not rep.failures, "\n".join(
        [f"{rep.scenario} ({rep.mode}): {len(rep.failures)} of {rep.points} points fail"]
        + rep.failures[:10])


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_kill_at_every_call(tmp_path, name):
    points = None if name in FULL else default_points(10)
    rep = sweep_isolated(name, str(tmp_path), mode="kill", points=points)
    _assert(rep)
    assert rep.outcomes.get("killed", 0) == rep.points


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_disk_full_at_every_call(tmp_path, name):
    rep = sweep_isolated(name, str(tmp_path), mode="enospc", points=default_points(8))
    _assert(rep)


def _fresh_python(code: str, timeout: float = 600) -> str:
    # forking a process that runs threads (JAX loaded by other tests) can deadlock: the
    # injected children are forked from a fresh interpreter
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 0, err[-3000:]
    return out


def test_overwrite_killed_between_the_two_renames_keeps_the_old_copy(tmp_path):
    # row 1, the exact window: the old copy renamed aside, the new one not yet in place
    out = _fresh_python(f"""
        import logging; logging.disable(logging.WARNING)
        from unickpt.testing.crash import SCENARIOS, count_calls, run_injected
        sc = SCENARIOS["overwrite_no_exchange"]
        total = count_calls(sc, {str(tmp_path / "count")!r})
        hits = []
        for k in range(1, total + 1):
            root = {str(tmp_path)!r} + f"/k{{k}}"
            sc.setup(root, None)
            out = run_injected(sc, root, k)
            if out.op.startswith("rename(.unickpt-tmp.step_3"):
                hits.append(k)
                sc.check(root, None, out)  # the next start restores the previous copy
        print(len(hits))
    """)
    assert out.split() == ["1"]


def test_crash_points_cover_every_call_when_asked():
    from unickpt.testing.crash import crash_points
    assert crash_points(5, None) == [1, 2, 3, 4, 5]
    sample = crash_points(100, 10, seed=3)
    assert len(sample) == 10 and sample[0] == 1 and sample[-1] == 100
    assert sample == crash_points(100, 10, seed=3)


def test_docs_testing_harness_example_runs_as_written():
    import re
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "testing.md")) as f:
        text = f.read()
    section = text.split("## Crash, disk-full and fuzz harness", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    _fresh_python(code)
