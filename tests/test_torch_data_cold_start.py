"""A loop that starts cold (nothing to resume) can checkpoint its DataLoader mid-epoch.

Run in a fresh interpreter: the torch adapter (which tracks loader positions) must be loaded
by ``CheckpointManager.restore`` itself, before the loop's first ``iter()``, even though a
cold start restores nothing.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")

CHILD = textwrap.dedent('''
    import sys, torch, unickpt
    from torch.utils.data import DataLoader
    loader = DataLoader(list(range(12)), batch_size=2, shuffle=True,
                        generator=torch.Generator().manual_seed(3))
    assert "unickpt_torch.data" not in sys.modules  # nothing has loaded the adapter yet
    root = sys.argv[1]
    with unickpt.CheckpointManager(root) as mgr:
        r = mgr.restore({"loader": loader})
        it = iter(r.state["loader"])
        seen = [next(it).tolist() for _ in range(2)]
        mgr.save(2, {"loader": loader})
    rest = [b.tolist() for b in it]
    fresh = DataLoader(list(range(12)), batch_size=2, shuffle=True,
                       generator=torch.Generator().manual_seed(99))
    with unickpt.CheckpointManager(root) as mgr:
        r = mgr.restore({"loader": fresh})
    assert r.step == 2 and [b.tolist() for b in fresh] == rest, (seen, rest)
    print("ok")
''')


def test_cold_start_loader_is_tracked_from_its_first_iteration(tmp_path):
    out = subprocess.run([sys.executable, "-W", "error", "-c", CHILD, str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
