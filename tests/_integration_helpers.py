"""Run a training script in a subprocess (own process group, timeout), and compare results."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_script(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``tests/<script> args`` with this worktree on the path; kill its group on timeout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "adapters"),
                                         env.get("PYTHONPATH", "")])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{script} {' '.join(args)} timed out after {timeout}s:\n"
                             f"{out[-4000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{path: leaf}`` of a loaded tree (dicts and lists)."""
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in flat(v, f"{prefix}{k}/").items()}
    if isinstance(tree, (list, tuple)):
        return {k2: v2 for i, v in enumerate(tree) for k2, v2 in flat(v, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): tree}


def assert_trees_bitwise(a: Any, b: Any) -> int:
    """Same paths, same leaves bit for bit (arrays: dtype, shape, bytes); returns #arrays."""
    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb), f"paths differ: {sorted(set(fa) ^ set(fb))[:10]}"
    n = 0
    for k in fa:
        x, y = fa[k], fb[k]
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape, k
            assert x.tobytes() == y.tobytes(), f"{k} differs"
            n += 1
        else:
            assert type(x) is type(y) and (x == y or (x != x and y != y)), f"{k}: {x!r} != {y!r}"
    return n
