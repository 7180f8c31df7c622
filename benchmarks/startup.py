"""Start-up cost as whole processes: ``import unickpt`` vs ``import numpy``, and ``unickpt ls``.

    python benchmarks/startup.py [--repeats 7] [--out bench-results]

Each figure is the wall time of a fresh ``python`` process (interpreter start included), best
of ``--repeats`` and median, the commands alternating so background load hits them alike.
``unickpt ls`` runs on a run root of 100 committed checkpoints (tiny states saved through
``CheckpointManager``).  ``python -X importtime -c "import unickpt"`` gives the slowest
imports (cumulative), which is where a lazy import would pay.  Targets (issue 20):
``import unickpt`` <= 1.5x ``import numpy``; ``unickpt ls`` on 100 checkpoints < 0.6 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # this checkout's unickpt (and its adapters) win over an installed one, in the children too
    parts = [REPO, os.path.join(REPO, "adapters")] + \
        [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    # An installed unickpt has its bytecode compiled (pip compiles at install time), and so
    # has numpy: without this, every start would compile unickpt's modules from source (the
    # untimed warm-up run below writes the bytecode) and time the compiler, not the import.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=120)
    return time.perf_counter() - t0


def build_root(root: str, n: int = 100) -> None:
    """A run root with ``n`` committed checkpoints, built in a child process (untimed)."""
    code = ("import sys, numpy as np, unickpt\n"
            "with unickpt.CheckpointManager(sys.argv[1], keep_last=None) as m:\n"
            "    for s in range(1, int(sys.argv[2]) + 1):\n"
            "        m.save(s, {'w': np.full(4, s, np.float32), 'step': s}, force=True,\n"
            "               metrics={'loss': 1.0 / s})\n")
    subprocess.run([sys.executable, "-c", code, root, str(n)], env=_env(), check=True,
                   timeout=600)


def import_profile(env: dict[str, str], top: int = 8) -> list[tuple[str, float]]:
    """The ``top`` slowest packages ``import unickpt`` pulls in (cumulative s, one process)."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", "import unickpt"], env=env,
                       capture_output=True, text=True, timeout=120, check=True)
    rows = []
    for line in p.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self, cum, name = line[len("import time:"):].split("|", 2)
        rows.append((name.rstrip(), int(cum) / 1e6))
    # whole packages (no dot) other than unickpt itself: what an import of unickpt pulls in
    tops = [(n.strip(), c) for n, c in rows if "." not in n and n.strip() != "unickpt"]
    return sorted(tops, key=lambda x: -x[1])[:top]


def measure(repeats: int = 7, n_ckpts: int = 100, log: Any = print) -> dict[str, Any]:
    env = _env()
    py = sys.executable
    work = tempfile.mkdtemp(prefix=".startup-")
    root = os.path.join(work, "run")
    try:
        build_root(root, n_ckpts)
        cmds = {"python -c pass": [py, "-c", "pass"],
                "import numpy": [py, "-c", "import numpy"],
                "import unickpt": [py, "-c", "import unickpt"],
                f"unickpt ls (root of {n_ckpts})": [py, "-m", "unickpt", "ls", root]}
        times: dict[str, list[float]] = {k: [] for k in cmds}
        for c in cmds.values():  # warm the OS file cache for every command once, untimed
            _run(c, env)
        for _ in range(repeats):
            for k, c in cmds.items():
                times[k].append(_run(c, env))
        slow = import_profile(env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res: dict[str, Any] = {"repeats": repeats, "n_ckpts": n_ckpts, "times": times,
                           "best": {k: min(v) for k, v in times.items()},
                           "median": {k: statistics.median(v) for k, v in times.items()},
                           "slowest_imports": slow}
    b = res["best"]
    ls_key = f"unickpt ls (root of {n_ckpts})"
    res["targets"] = [
        ("start-up: `import unickpt` <= 1.5x `import numpy` (whole process, best)",
         f"{b['import unickpt']:.2f} s vs {b['import numpy']:.2f} s = "
         f"{b['import unickpt'] / b['import numpy']:.2f}x",
         b["import unickpt"] <= 1.5 * b["import numpy"]),
        (f"start-up: `unickpt ls` on {n_ckpts} checkpoints < 0.6 s (whole process, best)",
         f"{b[ls_key]:.2f} s", b[ls_key] < 0.6)]
    return res


def markdown(res: dict[str, Any]) -> str:
    lines = [f"### start-up (whole processes; best and median of {res['repeats']})", "",
             "| command | best | median | spread (max/min) |", "|---|---:|---:|---:|"]
    for k, v in res["times"].items():
        lines.append(f"| `{k}` | {min(v):.3f} s | {statistics.median(v):.3f} s | "
                     f"{max(v) / min(v):.2f}x |")
    lines += ["", "Slowest packages under `import unickpt` (cumulative, one `-X importtime` run): "
              + ", ".join(f"`{n}` {c * 1000:.0f} ms" for n, c in res["slowest_imports"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    res = measure(args.repeats)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "startup.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(res))
    for t, v, ok in res["targets"]:
        print(f"{t}: {v} -> {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
