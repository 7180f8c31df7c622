"""The ``unickpt`` command line: inspect, verify, diff (through typer's CliRunner and once as a
real ``python -m unickpt`` process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from typer.testing import CliRunner

import unickpt
from unickpt import cli
from unickpt.cli import app
from unickpt.testing.compare import diff_trees
from unickpt.tree import Piece, ShardedArray

runner = CliRunner(env={"COLUMNS": "200"})  # no table wrapping in assertions


def _tree() -> dict:
    a = np.arange(8.0).reshape(2, 4)
    return {
        "params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                   "bf": np.ones(3, ml_dtypes.bfloat16)},
        "step": 3,
        "opt": [np.zeros(2), (1, "x")],
        "when": np.array(["2024-01-01"], "datetime64[ns]"),
        "s": ShardedArray((2, 4), a.dtype, [Piece(((0, 1), (0, 4)), a[:1]),
                                            Piece(((1, 2), (0, 4)), a[1:])]),
        "[bold]": b"\x00\xff",
        "nan": float("nan"),
    }


@pytest.fixture
def ck(tmp_path) -> str:
    p = str(tmp_path / "a")
    unickpt.save(p, _tree(), metadata={"lr": 0.1, "run": "demo"}, _info={"step": 3})
    return p


def _run(*args: str):
    # wide enough that rich never wraps a report line inside a table cell
    return runner.invoke(app, list(args), terminal_width=250)


# ------------------------------------------------------------------ inspect
def test_inspect_shows_tree_dtypes_shapes_sizes_metadata(ck):
    r = _run("inspect", ck)
    assert r.exit_code == 0, r.output
    out = r.output
    for text in ("format v2", "w: float32[2, 3] 24 B", "bf: bfloat16[3] 6 B", "step: int = 3",
                 "when: datetime64[ns][1] 8 B", "s: float64[2, 4] 64 B sharded",
                 "\"[bold]\": bytes = b'\\x00\\xff'", "1 tuple(2)", "nan: float = nan",
                 "metadata", "lr: 0.1", "run: 'demo'", "info", "step: 3"):
        assert text in out, (text, out)


def test_inspect_json(ck):
    r = _run("inspect", "--json", ck)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["format_version"] == 2 and doc["metadata"] == {"lr": 0.1, "run": "demo"}
    leaves = {lf["path"]: lf for lf in doc["leaves"]}
    assert leaves["params/w"] == {"path": "params/w", "kind": "array", "dtype": "float32",
                                  "shape": [2, 3], "nbytes": 24, "value": None}
    assert leaves["s"]["kind"] == "sharded" and leaves["s"]["shape"] == [2, 4]
    assert leaves['"[bold]"']["value"] == {"bytes_hex": "00ff"}
    assert leaves["nan"]["value"] == "nan"  # strict JSON: non-finite floats as strings
    assert doc["total_bytes"] == 24 + 6 + 16 + 8 + 64
    assert doc["info"] == {"step": 3}


def test_inspect_root_leaf(tmp_path):
    unickpt.save(tmp_path / "r", np.arange(3, dtype=np.int16))
    r = _run("inspect", str(tmp_path / "r"))
    assert r.exit_code == 0 and "<root>: int16[3] 6 B" in r.output


def test_inspect_unreadable_exits_2(tmp_path):
    r = _run("inspect", str(tmp_path / "missing"))
    assert r.exit_code == 2
    assert "CheckpointNotFoundError" in r.output and "not a directory" in r.output


# ------------------------------------------------------------------ verify
def test_verify_ok(ck):
    r = _run("verify", ck)
    assert r.exit_code == 0, r.output
    assert "OK" in r.output and "6 arrays" in r.output


def test_verify_names_damaged_leaves_and_exits_1(ck):
    with unickpt.format.CheckpointReader(ck) as rd:
        e = rd.manifest.arrays[0]
    with open(os.path.join(ck, "arrays.safetensors"), "r+b") as f:
        f.seek(e.offset)
        f.write(b"\x7f")
    r = _run("verify", ck)
    assert r.exit_code == 1
    assert "CORRUPT" in r.output and "1 of 6 arrays damaged" in r.output
    assert "  params/w\n" in r.output


def test_verify_missing_array_file_lists_every_leaf(ck):
    os.remove(os.path.join(ck, "arrays.safetensors"))
    r = _run("verify", ck)
    assert r.exit_code == 1 and "6 of 6 arrays damaged" in r.output


def test_verify_unreadable_manifest_exits_2(ck):
    with open(os.path.join(ck, "manifest.msgpack"), "wb") as f:
        f.write(b"garbage")
    r = _run("verify", ck)
    assert r.exit_code == 2
    assert "CorruptCheckpointError" in r.output and "not a msgpack document" in r.output


def test_verify_shows_progress_for_large_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "PROGRESS_MIN_BYTES", 0)
    p = str(tmp_path / "big")
    unickpt.save(p, {f"x{i}": np.zeros(1000) for i in range(5)})
    calls = []
    real = unickpt.format.CheckpointReader.verify_all

    def spy(self, progress=None):
        calls.append(progress)
        return real(self, progress)
    monkeypatch.setattr(unickpt.format.CheckpointReader, "verify_all", spy)
    r = _run("verify", p)
    assert r.exit_code == 0 and calls and calls[0] is not None


# ------------------------------------------------------------------ diff
def test_diff_identical_exits_0(ck, tmp_path):
    other = str(tmp_path / "b")
    unickpt.save(other, _tree(), metadata={"different": "metadata is not compared"})
    r = _run("diff", ck, other)
    assert r.exit_code == 0, r.output
    assert "IDENTICAL" in r.output


def test_diff_reports_every_kind_of_difference(ck, tmp_path):
    t = _tree()
    t["params"]["w"] = t["params"]["w"] + np.array([[0, 0, 0], [0, 0.5, -2]], np.float32)
    t["params"]["bf"] = t["params"]["bf"].astype(np.float32)   # dtype change
    t["step"] = 4                                              # scalar value
    t["opt"][1] = [1, "x"]                                     # tuple -> list
    del t["nan"]                                               # missing
    t["extra"] = None                                          # extra
    t["when"] = np.array(["2024-01-02"], "datetime64[ns]")     # non-numeric array
    other = str(tmp_path / "b")
    unickpt.save(other, t)
    r = _run("diff", ck, other)
    assert r.exit_code == 1, r.output
    out = r.output
    assert "2 of 6 elements differ, max |A-B| = 2.0, first at [1, 1]: A=4.0, B=4.5" in out
    assert "A is bfloat16[3], B is float32[3]" in out
    assert "int: A=3, B=4" in out and "A is a tuple, B is a list" in out
    assert "missing in B" in out and "extra in B" in out
    assert "1 of 1 elements differ, first at [0]" in out
    assert "DIFFERENT: 7 differences over 11 leaves" in out


def test_diff_json_and_bit_level_equality(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    unickpt.save(a, {"x": np.array([0.0, 1.0, np.nan]), "f": 0.0})
    unickpt.save(b, {"x": np.array([-0.0, 1.0, np.nan]), "f": -0.0})
    r = _run("diff", "--json", a, b)
    assert r.exit_code == 1
    doc = json.loads(r.output)
    assert doc["equal"] is False
    leaves = {d["path"]: d for d in doc["leaves"]}
    # -0.0 vs 0.0 is a bit difference (max |a-b| 0); equal NaNs are equal bits
    assert leaves["x"]["ndiff"] == 1 and leaves["x"]["first_index"] == [0]
    assert leaves["x"]["max_abs_diff"] == 0.0
    assert leaves["f"]["status"] == "differs"


def test_diff_of_a_corrupt_checkpoint_exits_2_naming_the_leaf(ck, tmp_path):
    other = str(tmp_path / "b")
    unickpt.save(other, _tree())
    with unickpt.format.CheckpointReader(other) as rd:
        e = rd.manifest.arrays[1]
    with open(os.path.join(other, "arrays.safetensors"), "r+b") as f:
        f.seek(e.offset)
        f.write(b"\x01")
    r = _run("diff", ck, other)
    assert r.exit_code == 2 and "leaf params/bf: checksum mismatch" in r.output


def test_diff_unreadable_exits_2(ck, tmp_path):
    r = _run("diff", ck, str(tmp_path / "nope"))
    assert r.exit_code == 2 and "CheckpointNotFoundError" in r.output


def test_diff_trees_exact_structure():
    d = diff_trees({"a": {"b": 1}, "c": [1, 2]}, {"a": {}, "c": [1, 2, 3], "d": 1},
                   exact_structure=True)
    assert [(x.path, x.kind) for x in d] == [("a/b", "missing"), ("c/2", "extra"),
                                             ("d", "extra")]
    d = diff_trees({"a": 1, "b": 2}, {"b": 2, "a": 1}, exact_structure=True)
    assert [(x.path, x.detail) for x in d] == [("<root>", "same keys in a different order")]
    assert diff_trees({"a": 1, "b": 2}, {"b": 2, "a": 1}) == []
    d = diff_trees({"t": (1, 2)}, {"t": [1, 2]}, exact_structure=True)
    assert [(x.path, x.detail) for x in d] == [("t", "a is a tuple, b is a list")]


def test_diff_all_lists_equal_leaves(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    unickpt.save(a, {"x": np.arange(3.0), "y": 1})
    unickpt.save(b, {"x": np.arange(3.0), "y": 2})
    r = _run("diff", "--all", "--json", a, b)
    leaves = {d["path"]: d["status"] for d in json.loads(r.output)["leaves"]}
    assert r.exit_code == 1 and leaves == {"x": "equal", "y": "differs"}


def test_commands_can_be_added_by_other_modules(monkeypatch, tmp_path):
    import typer

    mod = tmp_path / "unickpt_cli_extra_for_test.py"
    mod.write_text("import typer\nfrom unickpt.cli import app\n\n"
                   "@app.command('hello')\ndef hello(name: str) -> None:\n"
                   "    typer.echo(f'hi {name}')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["unickpt_cli_extra_for_test", "no_such_mod"])
    before = list(app.registered_commands)
    try:
        with pytest.raises(SystemExit) as ei:
            cli.main(["hello", "you"])
        assert ei.value.code == 0
        assert "hello" in {c.name for c in app.registered_commands}
        r = runner.invoke(app, ["hello", "me"])
        assert r.exit_code == 0 and r.output == "hi me\n"
    finally:
        app.registered_commands[:] = before
        sys.modules.pop("unickpt_cli_extra_for_test", None)
    assert isinstance(app, typer.Typer)


def test_python_m_unickpt_subprocess(ck, tmp_path):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(unickpt.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-m", "unickpt", "verify", ck], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "OK" in p.stdout
    with open(os.path.join(ck, "arrays.safetensors"), "r+b") as f:
        f.truncate(100)
    p = subprocess.run([sys.executable, "-m", "unickpt", "verify", ck], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 1 and "truncated" not in p.stderr and "damaged" in p.stdout
