"""In CI a missing framework fails the run; locally it skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

_MISSING = '''
import pytest
mod = pytest.importorskip("unickpt_no_such_framework_xyz")

def test_uses_it():
    assert mod
'''
_RUNTIME_SKIP = '''
import pytest

def test_skips_for_a_missing_thing():
    pytest.skip("torch adapter not importable")

def test_skips_for_cuda():
    pytest.skip("needs CUDA")
'''


def _run(tmp_path, body: str, ci: str | None) -> subprocess.CompletedProcess:
    for name in ("conftest.py", "_seaweed.py"):  # the conftest imports the S3 fixtures
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    (tmp_path / "test_x.py").write_text(body)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "no:randomly", "-o", "addopts=", "--rootdir", str(tmp_path),
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("ci,rc", [(None, 5), ("true", 2), ("1", 2)])
def test_missing_module_fails_only_in_ci(tmp_path, ci, rc):
    p = _run(tmp_path, _MISSING, ci)
    assert p.returncode == rc, p.stdout + p.stderr
    if rc == 2:
        assert "must import in CI" in p.stdout


def test_runtime_skips_fail_in_ci_except_hardware(tmp_path):
    p = _run(tmp_path, _RUNTIME_SKIP, "true")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 failed" in p.stdout and "1 skipped" in p.stdout, p.stdout
    assert "skipped in CI, where everything is installed" in p.stdout
    assert _run(tmp_path, _RUNTIME_SKIP, None).returncode == 0
