"""The pytest plugin: fixtures and the --unickpt-examples option, seen from a user's test."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

TRAINER = '''
import os, numpy as np, unickpt

def train(root, total_steps, stop_at=None, *, bug=False):
    done = sorted(int(n[5:]) for n in os.listdir(root) if n.startswith("step_"))
    state = unickpt.load(f"{root}/step_{done[-1]}") if done else {"x": np.zeros(2), "step": 0}
    for step in range(state["step"] + (0 if bug and done else 1), total_steps + 1):
        state = {"x": state["x"] * 0.5 + step, "step": step}
        if step == stop_at:
            return state
        if (step % 2 == 0 or step == total_steps) and not os.path.exists(f"{root}/step_{step}"):
            unickpt.save(f"{root}/step_{step}", state)
    return state
'''


def test_fixtures_and_option_make_a_user_test_one_line(pytester: pytest.Pytester):
    pytester.makepyfile(trainer=TRAINER)
    pytester.makepyfile(test_user='''
import functools, os
import pytest
import trainer
from unickpt.testing import ResumeMismatchError

def test_root(unickpt_root):
    assert unickpt_root.is_dir() and os.listdir(unickpt_root) == []

def test_examples(unickpt_examples):
    assert unickpt_examples == 4

def test_resumes(unickpt_resume_check):
    tried = unickpt_resume_check(trainer.train, 6)
    assert 1 <= len(tried) <= 4

def test_buggy(unickpt_resume_check, tmp_path):
    with pytest.raises(ResumeMismatchError) as e:
        unickpt_resume_check(functools.partial(trainer.train, bug=True), 6)
    assert e.value.schedule == (3,), str(e.value)
    assert "x: float64[2]" in str(e.value)
    kept = str(e.value).split("checkpoints are kept in ")[1].splitlines()[0]
    assert kept.startswith(str(tmp_path)) and "step_2" in os.listdir(kept)
''')
    result = pytester.runpytest("--unickpt-examples=4", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["unickpt: 4 interruption schedules per resume check"])


def test_ini_setting_and_default(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("UNICKPT_EXAMPLES", raising=False)
    pytester.makepyfile(test_a="def test_n(unickpt_examples):\n    assert unickpt_examples == 7\n")
    pytester.makeini("[pytest]\nunickpt_examples = 7\n")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    pytester.makeini("[pytest]\n")
    pytester.makepyfile(test_a="def test_n(unickpt_examples):\n    assert unickpt_examples == 10\n")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    monkeypatch.setenv("UNICKPT_EXAMPLES", "3")
    pytester.makepyfile(test_a="def test_n(unickpt_examples):\n    assert unickpt_examples == 3\n")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_bad_example_count_is_a_usage_error(pytester: pytest.Pytester):
    pytester.makepyfile(test_a="def test_n():\n    pass\n")
    result = pytester.runpytest("--unickpt-examples=0", "-p", "no:cacheprovider")
    result.stderr.fnmatch_lines(["*--unickpt-examples=0: expected a positive number*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
