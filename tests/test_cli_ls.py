"""``unickpt ls`` (unickpt.cli.cmd_ls.ls): table and JSON over a run root."""

from __future__ import annotations

import json
import os
import re

import numpy as np

import unickpt
from unickpt.cli.cmd_ls import ls


def _rows(out: str) -> dict[str, list[str]]:
    """Table rows by step, as their cells (columns are separated by two or more spaces)."""
    return {cells[0]: cells for ln in out.splitlines()
            if re.match(r"^ *\d+  \d{4}-\d\d-\d\d ", ln)
            for cells in [re.split(r" {2,}", ln.strip())]}


def make_root(root) -> None:
    os.makedirs(root / "run_3" / "step_1")
    (root / "run_3" / "step_1" / "manifest.msgpack").write_bytes(b"")
    with unickpt.CheckpointManager(root, keep_last=2, keep_every=4, keep_best=1,
                                   best_metric="loss") as m:
        for s in range(1, 10):
            m.save(s, {"w": np.zeros(1000)}, metrics={"loss": abs(5 - s) + 0.5})
    os.mkdir(root / ".unickpt-tmp.step_10.otherhost.12.abcd1234")
    os.mkdir(root / "step_77")


def test_ls_json(tmp_path, capsys):
    make_root(tmp_path)
    assert ls(str(tmp_path), json_out=True) == 0
    data = json.loads(capsys.readouterr().out)
    got = {c["step"]: c["kept_by"] for c in data["checkpoints"]}
    assert got == {4: ["every"], 5: ["best"], 8: ["last", "every"], 9: ["newest", "last"]}
    c9 = data["checkpoints"][-1]
    assert c9["metrics"] == {"loss": 4.5} and c9["size"] > 8000
    assert c9["size"] == unickpt.CheckpointManager(tmp_path).latest().size
    assert data["latest_pointer"] == "step_9"
    assert data["uncommitted"] == ["step_77"]
    assert [t["host"] for t in data["temps"]] == ["otherhost"]
    assert data["temps"][0]["stale"] is False  # recent, other host: maybe still running
    assert data["runs"] == [{"run": 3, "path": str(tmp_path / "run_3"), "checkpoints": 1,
                             "newest": 1}]
    assert data["locked_by"] is None


def test_ls_table(tmp_path, capsys):
    make_root(tmp_path)
    with unickpt.CheckpointManager(tmp_path) as m:
        m.resolve_start()  # holds the lock while ls runs
        assert ls(str(tmp_path)) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert list(rows) == ["4", "5", "8", "9"]
    size = sum(f.stat().st_size for f in (tmp_path / "step_9").iterdir())
    # the state never changes: step 9 shares its array file with step 8 and writes none of it
    assert rows["9"][2:] == [f"{size / 1024:.1f} KiB (0 B written)", "loss=4.5", "newest, last",
                             "ok"]
    assert "latest pointer: step_9" in out
    assert f"writer lock held by: pid={os.getpid()}" in out
    assert ".unickpt-tmp.step_10.otherhost.12.abcd1234" in out and "maybe running" in out
    assert "uncommitted (not a checkpoint): step_77" in out
    assert "archived run run_3: 1 checkpoints, newest step 1" in out


def test_ls_unknown_rules_and_stale_pointer(tmp_path, capsys):
    unickpt.save(tmp_path / "step_2", {"w": np.zeros(2)})  # plain save: no manager info
    (tmp_path / "latest").write_text("step_1\n")
    assert ls(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert _rows(out)["2"][2:] == ["474 B", "-", "-", "ok"]
    assert "latest pointer: step_1  (stale: the newest committed is 2; the scan wins)" in out


def test_ls_not_a_root(tmp_path, capsys):
    assert ls(str(tmp_path / "nope")) == 3
    assert "unickpt ls: error: " in capsys.readouterr().err


def test_ls_is_a_cli_command(tmp_path):
    import subprocess
    import sys

    import numpy as np

    import unickpt

    with unickpt.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, {"w": np.zeros(2)})
        mgr.save(2, {"w": np.ones(2)})
    out = subprocess.run([sys.executable, "-m", "unickpt", "ls", str(tmp_path), "--json"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    import json

    steps = [c["step"] for c in json.loads(out)["checkpoints"]]
    assert steps == [2]


def test_ls_table_shows_damaged_checkpoints(tmp_path, capsys):
    with unickpt.CheckpointManager(tmp_path, keep_last=5) as m:
        for s in (1, 2, 3):  # a different state each step: no file is shared between steps
            m.save(s, {"w": np.full(1000, float(s))}, metrics={"loss": float(s)})
    (tmp_path / "step_3" / "manifest.msgpack").write_bytes(b"\x85trunc")
    size = (tmp_path / "step_2" / "arrays.safetensors").stat().st_size
    os.truncate(tmp_path / "step_2" / "arrays.safetensors", 100)
    assert ls(str(tmp_path)) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert list(rows) == ["1", "2", "3"] and rows["1"][-1] == "ok"
    assert rows["2"][-1] == (f"DAMAGED: array file arrays.safetensors is 100 bytes, the "
                             f"manifest says {size}")
    assert rows["3"][-1] == "DAMAGED: manifest unreadable (CorruptCheckpointError)"
    assert "2 damaged checkpoint(s): `unickpt verify` names the damaged arrays; a manager " \
           "resumes an older step with resume=<step>" in out
    assert ls(str(tmp_path), json_out=True) == 0
    data = {c["step"]: c for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert (data[1]["damage"], data[1]["readable"]) == (None, True)
    assert data[2]["readable"] is True and data[2]["damage"].startswith("array file")
    assert data[3]["readable"] is False
