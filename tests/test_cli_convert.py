"""``unickpt convert``: Orbax <-> unickpt through the command line, bit for bit."""

import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import unickpt

pytest.importorskip("orbax.checkpoint")


def test_convert_round_trip_through_orbax(tmp_path):
    tree = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
                       "b": np.ones(4, dtype=ml_dtypes.bfloat16)},
            "step": np.int64(7)}
    src = tmp_path / "src"
    unickpt.save(src, tree)
    cmd = [sys.executable, "-m", "unickpt", "convert"]
    subprocess.run([*cmd, str(src), str(tmp_path / "orbax"), "--to", "orbax"], check=True,
                   capture_output=True, timeout=300)
    subprocess.run([*cmd, str(tmp_path / "orbax"), str(tmp_path / "back"), "--to", "unickpt"],
                   check=True, capture_output=True, timeout=300)
    again = subprocess.run([*cmd, str(src), str(tmp_path / "orbax"), "--to", "orbax", "-q"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 4, again.stderr  # refused: the destination exists
    assert again.stderr.startswith("unickpt convert: error: ")
    back = unickpt.load(tmp_path / "back")
    for k in ("w", "b"):
        got, want = back["params"][k], tree["params"][k]
        assert got.dtype == want.dtype and got.shape == want.shape
        assert got.tobytes() == want.tobytes()
    assert int(np.asarray(back["step"])) == 7


def test_convert_rejects_unknown_target(tmp_path):
    unickpt.save(tmp_path / "src", {"w": np.zeros(2)})
    r = subprocess.run([sys.executable, "-m", "unickpt", "convert", str(tmp_path / "src"),
                        str(tmp_path / "x"), "--to", "tf"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2  # a usage error (unickpt --help: exit status table)
    assert "argument --to: invalid choice: 'tf' (choose from" in r.stderr
    assert not (tmp_path / "x").exists()
