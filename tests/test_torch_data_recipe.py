"""docs/torch.md's determinism recipe, run exactly as written.

The code block after the ``<!-- recipe -->`` marker is executed; the run is interrupted
mid-epoch (the save of step ``stop`` is the last thing it does), resumed in fresh objects, and
must end with bitwise equal weights; ``unickpt diff`` must find the final checkpoints equal.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import unickpt

# Workers are forked; when another test of the session has imported JAX, JAX warns at every
# fork (it is multithreaded). These workers run torch code only.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:os.fork\(\) was called:RuntimeWarning")

DOC = Path(__file__).resolve().parents[1] / "docs" / "torch.md"


def recipe() -> dict:
    text = DOC.read_text()
    m = re.search(r"<!-- recipe:[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert m, "docs/torch.md lost its recipe block"
    ns: dict = {"__name__": "recipe"}
    exec(compile(m.group(1), str(DOC), "exec"), ns)
    return ns


class Stop(Exception):
    pass


@pytest.mark.parametrize(("workers", "stop"), [(0, 4), (0, 9), (2, 9)])
def test_recipe_resumes_bitwise_and_diff_finds_nothing(tmp_path, monkeypatch, workers, stop):
    train = recipe()["train"]
    ref = train(tmp_path / "ref", num_workers=workers)

    real_save = unickpt.CheckpointManager.save

    def save_then_die(self, step, state, **kw):
        done = real_save(self, step, state, **kw)
        if step == stop:
            raise Stop  # killed right after the save of step `stop` (mid-epoch: 7 per epoch)
        return done

    with monkeypatch.context() as m:
        m.setattr(unickpt.CheckpointManager, "save", save_then_die)
        with pytest.raises(Stop):
            train(tmp_path / "run", num_workers=workers)
    resumed = train(tmp_path / "run", num_workers=workers)

    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert a.numpy().tobytes() == b.numpy().tobytes(), name
    last = [unickpt.CheckpointManager(tmp_path / r).latest().path for r in ("ref", "run")]
    out = subprocess.run([sys.executable, "-m", "unickpt", "diff", *map(str, last)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
