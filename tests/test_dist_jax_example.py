"""examples/jax_multiprocess.py: 2 processes x 2 devices train, resume, and end bit for bit.

The job is run once for 4 steps; its checkpoint directory minus the last checkpoint stands in
for a job killed after step 2 (the newest committed checkpoint is then step 2); the same
command resumes it and must print the same final parameters and per-process keys.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "jax_multiprocess.py")
FINAL = re.compile(r"\[process (\d)\] step 4 params ([0-9a-f]+) key ([0-9a-f]+)")


def run(root: str) -> str:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "adapters")]))
    r = subprocess.run([sys.executable, EXAMPLE, root, "--steps", "4", "--timeout", "150"],
                       env=env, capture_output=True, text=True, timeout=180,
                       start_new_session=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout


def test_example_resumes_bitwise(tmp_path):
    a = str(tmp_path / "a")
    out = run(a)
    final = sorted(FINAL.findall(out))
    assert [p for p, _, _ in final] == ["0", "1"], out
    assert final[0][1] == final[1][1]  # one global parameter state
    assert final[0][2] != final[1][2]  # each process its own key
    assert sorted(os.listdir(a)) == [".unickpt.lock", "latest", "step_2", "step_4"]
    b = str(tmp_path / "b")  # the job as if killed after step 3: step_2 is the newest
    shutil.copytree(a, b, ignore=shutil.ignore_patterns("step_4", ".unickpt.lock"))
    with open(os.path.join(b, "latest"), "w") as f:
        f.write("step_2")
    out2 = run(b)
    assert "[process 0] resumed from step 2" in out2 and "[process 1] resumed from step 2" in out2
    assert sorted(FINAL.findall(out2)) == final
