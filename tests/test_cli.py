"""The ``unickpt`` command line: inspect, verify, diff, the exit-code table and start-up
(through :func:`unickpt.cli.main` in-process, and as real ``python -m unickpt`` processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import unickpt
from unickpt.api import save_recorded
from unickpt.cli import ExitCode, cmd_verify, main
from unickpt.testing.compare import diff_trees
from unickpt.tree import Piece, ShardedArray


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
    save_recorded(p, _tree(), metadata={"lr": 0.1, "run": "demo"}, info={"step": 3})
    return p


class _Result:
    def __init__(self, exit_code: int, out: str, err: str):
        self.exit_code, self.stdout, self.stderr = exit_code, out, err
        self.output = out + err


@pytest.fixture
def _run(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich never wraps a report line

    def run(*args: str) -> _Result:
        code = main(list(args))
        cap = capsys.readouterr()
        return _Result(code, cap.out, cap.err)
    return run


# ------------------------------------------------------------------ inspect
def test_inspect_shows_tree_dtypes_shapes_sizes_metadata(ck, _run):
    r = _run("inspect", ck)
    assert r.exit_code == 0, r.output
    out = r.output
    for text in ("format v3", "w: float32[2, 3] 24 B", "bf: bfloat16[3] 6 B", "step: int = 3",
                 "when: datetime64[ns][1] 8 B", "s: float64[2, 4] 64 B sharded",
                 "\"[bold]\": bytes = b'\\x00\\xff'", "1 tuple(2)", "nan: float = nan",
                 "metadata", "lr: 0.1", "run: 'demo'", "info", "step: 3"):
        assert text in out, (text, out)


def test_inspect_json(ck, _run):
    r = _run("inspect", "--json", ck)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["format_version"] == 3 and doc["metadata"] == {"lr": 0.1, "run": "demo"}
    leaves = {lf["path"]: lf for lf in doc["leaves"]}
    assert leaves["params/w"] == {"path": "params/w", "kind": "array", "dtype": "float32",
                                  "shape": [2, 3], "nbytes": 24, "value": None}
    assert leaves["s"]["kind"] == "sharded" and leaves["s"]["shape"] == [2, 4]
    assert leaves['"[bold]"']["value"] == {"bytes_hex": "00ff"}
    assert leaves["nan"]["value"] == "nan"  # strict JSON: non-finite floats as strings
    assert doc["total_bytes"] == 24 + 6 + 16 + 8 + 64
    assert doc["info"] == {"step": 3}


def test_inspect_root_leaf(tmp_path, _run):
    unickpt.save(tmp_path / "r", np.arange(3, dtype=np.int16))
    r = _run("inspect", str(tmp_path / "r"))
    assert r.exit_code == 0 and "<root>: int16[3] 6 B" in r.output


def test_inspect_unreadable_exits_3(tmp_path, _run):
    r = _run("inspect", str(tmp_path / "missing"))
    assert r.exit_code == ExitCode.UNREADABLE == 3 and r.stdout == ""
    assert r.stderr.startswith("unickpt inspect: error: CheckpointNotFoundError: ")
    assert "CheckpointNotFoundError" in r.output and "not a directory" in r.output


# ------------------------------------------------------------------ verify
def test_verify_ok(ck, _run):
    r = _run("verify", ck)
    assert r.exit_code == 0, r.output
    assert "OK" in r.output and "6 arrays" in r.output


def test_verify_names_damaged_leaves_and_exits_1(ck, _run):
    with unickpt.format.CheckpointReader(ck) as rd:
        e = rd.manifest.arrays[0]
    with open(os.path.join(ck, "arrays.safetensors"), "r+b") as f:
        f.seek(e.offset)
        f.write(b"\x7f")
    r = _run("verify", ck)
    assert r.exit_code == 1
    assert "CORRUPT" in r.output and "1 of 6 arrays damaged (checksum mismatch, truncated or missing data), 5 intact" in r.output
    assert "  params/w\n" in r.output


def test_verify_missing_array_file_lists_every_leaf(ck, _run):
    os.remove(os.path.join(ck, "arrays.safetensors"))
    r = _run("verify", ck)
    assert r.exit_code == 1 and "6 of 6 arrays damaged" in r.output


def test_verify_unreadable_manifest_exits_3(ck, _run):
    with open(os.path.join(ck, "manifest.msgpack"), "wb") as f:
        f.write(b"garbage")
    r = _run("verify", ck)
    assert r.exit_code == 3
    assert "CorruptCheckpointError" in r.output and "not a msgpack document" in r.output


def test_verify_shows_progress_for_large_checkpoints(tmp_path, monkeypatch, _run):
    monkeypatch.setattr(cmd_verify, "PROGRESS_MIN_BYTES", 0)
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
def test_diff_identical_exits_0(ck, tmp_path, _run):
    other = str(tmp_path / "b")
    unickpt.save(other, _tree(), metadata={"different": "metadata is not compared"})
    r = _run("diff", ck, other)
    assert r.exit_code == 0, r.output
    assert "IDENTICAL" in r.output


def test_diff_reports_every_kind_of_difference(ck, tmp_path, _run):
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


def test_diff_json_and_bit_level_equality(tmp_path, _run):
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


def test_diff_of_a_corrupt_checkpoint_exits_3_naming_the_leaf(ck, tmp_path, _run):
    other = str(tmp_path / "b")
    unickpt.save(other, _tree())
    with unickpt.format.CheckpointReader(other) as rd:
        e = rd.manifest.arrays[1]
    with open(os.path.join(other, "arrays.safetensors"), "r+b") as f:
        f.seek(e.offset)
        f.write(b"\x01")
    r = _run("diff", ck, other)
    assert r.exit_code == 3 and "leaf params/bf: checksum mismatch" in r.stderr


def test_diff_unreadable_exits_3(ck, tmp_path, _run):
    r = _run("diff", ck, str(tmp_path / "nope"))
    assert r.exit_code == 3 and "CheckpointNotFoundError" in r.output


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


def test_diff_all_lists_equal_leaves(tmp_path, _run):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    unickpt.save(a, {"x": np.arange(3.0), "y": 1})
    unickpt.save(b, {"x": np.arange(3.0), "y": 2})
    r = _run("diff", "--all", "--json", a, b)
    leaves = {d["path"]: d["status"] for d in json.loads(r.output)["leaves"]}
    assert r.exit_code == 1 and leaves == {"x": "equal", "y": "differs"}


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


# ------------------------------------------------------------------ damage (issue: reported badly)
def _many(tmp_path) -> tuple[str, list]:
    p = str(tmp_path / "many")
    unickpt.save(p, {f"a{i:02d}": np.full(100, i, np.float64) for i in range(35)})
    with unickpt.format.CheckpointReader(p) as rd:
        return p, list(rd.manifest.arrays), rd.manifest.files[0]


def test_verify_truncated_file_counts_intact_arrays_as_intact(tmp_path, _run):
    p, arrays, f = _many(tmp_path)
    cut = arrays[21].offset + 10  # arrays 0..20 whole, 21 cut inside, 22.. gone
    assert sorted(a.offset for a in arrays) == [a.offset for a in arrays]
    with open(os.path.join(p, f.name), "r+b") as fh:
        fh.truncate(cut)
    r = _run("verify", p)
    assert r.exit_code == ExitCode.NO == 1
    assert f"CORRUPT {p}: 14 of 35 arrays damaged (checksum mismatch, truncated or missing " \
           "data), 21 intact:" in r.stdout
    listed = [ln.strip() for ln in r.stdout.splitlines() if ln.startswith("  ")]
    assert listed == [f"a{i:02d}" for i in range(21, 35)]
    rep = unickpt.verify(p, raise_on_error=False)
    assert rep.bad == listed


def test_verify_intact_arrays_in_a_file_with_a_damaged_tail_and_header(tmp_path, _run):
    p, arrays, f = _many(tmp_path)
    with open(os.path.join(p, f.name), "r+b") as fh:
        fh.write(b"\xff" * 8)                     # safetensors header length destroyed
        fh.seek(arrays[3].offset + 5)
        fh.write(b"\x01")                         # one array's bytes flipped
        fh.seek(0, 2)
        fh.write(b"junk")                         # and the file padded
    r = _run("verify", p)
    assert r.exit_code == 1 and "1 of 35 arrays damaged" in r.stdout and "  a03\n" in r.stdout
    assert "file damaged: array file 'arrays.safetensors'" in r.stdout


def test_verify_truncated_file_with_a_flipped_byte_before_the_cut(tmp_path, _run):
    p, arrays, f = _many(tmp_path)
    with open(os.path.join(p, f.name), "r+b") as fh:
        fh.seek(arrays[3].offset + 5)
        fh.write(b"\x01")                         # one array's bytes flipped
        fh.truncate(arrays[30].offset)            # and the file cut after array 29
    r = _run("verify", p)
    assert r.exit_code == 1 and "6 of 35 arrays damaged" in r.stdout and "29 intact" in r.stdout
    listed = [ln.strip() for ln in r.stdout.splitlines() if ln.startswith("  ")]
    assert listed == ["a03", "a30", "a31", "a32", "a33", "a34"]


@pytest.mark.parametrize("damage", ["padded", "header"])
def test_verify_file_damage_that_spares_every_array_still_fails(tmp_path, _run, damage):
    """Appended bytes or a destroyed header damage no array's bytes, but load refuses the
    file: verify exits 1, counts 0 damaged arrays and says what is wrong with the file."""
    p, arrays, f = _many(tmp_path)
    with open(os.path.join(p, f.name), "r+b") as fh:
        if damage == "padded":
            fh.seek(0, 2)
            fh.write(b"junk")
        else:
            fh.write(b"\xff" * 8)                 # safetensors header length destroyed
    r = _run("verify", p)
    assert r.exit_code == 1 and "0 of 35 arrays damaged" in r.stdout, r.output
    assert "35 intact" in r.stdout and "file damaged: array file 'arrays.safetensors'" in r.stdout


def test_inspect_prints_file_sizes_on_disk_and_flags_truncation(tmp_path, _run):
    p, arrays, f = _many(tmp_path)
    r = _run("inspect", p)
    assert r.exit_code == 0
    assert f"  {f.name}: {f.size / 1024:.1f} KiB on disk\n" in r.stdout
    assert "damaged" not in r.stdout
    with open(os.path.join(p, f.name), "r+b") as fh:
        fh.truncate(1000)
    r = _run("inspect", p)
    assert r.exit_code == 0
    assert (f"  {f.name}: 1000 B on disk, TRUNCATED: the manifest says {f.size} bytes, "
            "the file has 1000\n") in r.stdout
    assert "damaged: a file differs from the manifest; run `unickpt verify`" in r.stdout
    doc = json.loads(_run("inspect", "--json", p).stdout)
    files = {x["name"]: x for x in doc["files"]}
    assert files[f.name] == {"name": f.name, "disk_bytes": 1000, "manifest_bytes": f.size,
                             "ok": False}
    assert files["manifest.msgpack"]["ok"] is True and doc["file_bytes"] == f.size
    os.remove(os.path.join(p, f.name))
    r = _run("inspect", p)
    assert f"  {f.name}: MISSING (the manifest says {f.size / 1024:.1f} KiB)" in r.stdout


# ------------------------------------------------------------------ diff: whole paths
def test_diff_never_cuts_tree_paths(tmp_path, _run, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    key = "conv1.bias_with_a_very_long_parameter_name_that_goes_on_and_on"
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    unickpt.save(a, {"optimizer": {"state": {key: {"exp_avg_sq": np.zeros(3)}}}})
    unickpt.save(b, {"optimizer": {"state": {key: {"exp_avg_sq": np.ones(3)}}}})
    r = _run("diff", a, b)
    assert r.exit_code == 1
    path = f"optimizer/state/{key}/exp_avg_sq"
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("differs"))
    assert line == f"differs  {path}  float64[3]: 3 of 3 elements differ, max |A-B| = 1.0, first at [0]: " \
                   "A=0.0, B=1.0"
    assert "…" not in r.stdout and "..." not in r.stdout


# ------------------------------------------------------------------ exit codes, help
def test_help_documents_the_exit_code_table(capsys):
    from unickpt.cli.exit_codes import TABLE

    with pytest.raises(SystemExit) as ei:
        main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert f"exit status (every command):\n{TABLE}" in out
    for name in ("inspect", "verify", "diff", "ls", "convert", "migrate"):
        assert f"    {name} " in out
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4, 130]


def test_readme_documents_every_exit_code():
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "README.md")
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    assert "| exit status | meaning |" in text
    for code in ExitCode:
        assert f"\n| {int(code)} | " in text, code


def test_usage_errors_exit_2(capsys):
    for argv in (["verify"], ["frobnicate"], ["ls", "/x", "--bogus"], ["convert", "a", "b"]):
        with pytest.raises(SystemExit) as ei:
            main(argv)
        assert ei.value.code == ExitCode.USAGE == 2, argv
        assert "unickpt" in capsys.readouterr().err
    assert main([]) == 2 and "usage: unickpt" in capsys.readouterr().out


def test_commands_are_registered_by_an_explicit_list():
    import unickpt.cli as cli

    names = [c.NAME for c in cli.COMMANDS]
    assert names == ["inspect", "verify", "diff", "ls", "convert", "migrate"]
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == names


def test_cli_start_up_imports_no_typer_rich_or_frameworks(tmp_path):
    with unickpt.CheckpointManager(tmp_path, keep_last=2) as m:
        m.save(1, {"w": np.zeros(2)})
    code = ("import sys\nfrom unickpt.cli import main\nrc = main(['ls', sys.argv[1]])\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'typer', 'rich', "
            "'pydantic', 'click', 'torch', 'jax', 'flax', 'unickpt_torch', 'unickpt_jax'})\n"
            "print('HEAVY', heavy, rc)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "HEAVY [] 0" in p.stdout
