"""docs/adapters.md runs as written: its toy framework, adapter and conformance test class."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "adapters.md"


def _files() -> dict[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    out = {}
    for block in blocks:
        first = block.splitlines()[0]
        assert first.startswith("# file: "), first
        out[first[len("# file: "):]] = block
    return out


def _run(tmp_path, files: dict[str, str]) -> tuple[int, str]:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
         "-o", "addopts=", "test_unickpt_toy.py"], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out


def test_the_documented_toy_adapter_passes_the_conformance_suite(tmp_path):
    files = _files()
    assert sorted(files) == ["test_unickpt_toy.py", "toy.py", "unickpt_toy.py"]
    rc, out = _run(tmp_path, files)
    assert rc == 0, out
    assert "7 passed" in out, out


def test_the_suite_catches_broken_adapters(tmp_path):
    """Teeth: an adapter that aliases live memory in snapshots, applies a restore while
    planning it, and forgets its RNG fails exactly the matching checks."""
    files = _files()
    src = files["unickpt_toy.py"]
    for old, new in [("obj.data.copy() if ctx.snapshot else obj.data", "obj.data"),
                     ("        want = target.data\n",
                      "        want = target.data\n        target.data[...] = 0.0\n"),
                     ("toy._rng.bit_generator.state = {", "_ = {")]:
        assert old in src
        src = src.replace(old, new)
    rc, out = _run(tmp_path, {**files, "unickpt_toy.py": src})
    assert rc == 1
    failed = sorted(re.findall(r"FAILED \S+::TestToyAdapter::(\w+)", out))
    assert failed == ["test_failed_restore_lists_paths_and_modifies_nothing",
                      "test_global_rng_round_trips",
                      "test_snapshot_is_isolated_from_later_mutation"], out
