"""examples/flax_quickstart.py runs, is killed part-way, resumes and ends bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("flax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flax_quickstart_resumes_bitwise():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "adapters")]))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "flax_quickstart.py")],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "SIGKILL after step 23" in r.stdout
    assert "resumed from step 18" in r.stdout
    assert "bitwise identical to the uninterrupted run: True" in r.stdout
