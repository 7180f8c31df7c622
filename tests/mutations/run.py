"""Plant each bug of ``table.MUTATIONS`` in a temporary copy of the repository and run its tests.

    python tests/mutations/run.py                 # all mutations
    python tests/mutations/run.py -k fsync        # those whose name contains "fsync"
    python tests/mutations/run.py --baseline      # also run the subsets on the unmutated copy

A mutation is CAUGHT when its test subset fails, MISSED when it passes, STALE when a pattern no
longer matches (update ``table.py`` after a refactor), TIMEOUT when the subset ran too long.
Exit status 1 if any mutation is missed or stale.  The working tree is never modified.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from table import MUTATIONS, Mutation  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def copy_repo(dst: str) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = os.path.join(REPO, f)
        if os.path.isfile(src):
            os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(src, os.path.join(dst, f))


def apply(m: Mutation, root: str) -> str | None:
    """Apply ``m`` under ``root``; the reason it is stale, or None."""
    for s in m.subs:
        path = os.path.join(root, s.file)
        if not os.path.exists(path):
            return f"{s.file} does not exist"
        text = open(path).read()
        n = text.count(s.search)
        if n == 0 or (s.count is not None and n != s.count):
            return f"{s.file}: {s.search!r} found {n} times (expected {s.count or '>= 1'})"
        text = text.replace(s.search, s.replace)
        with open(path, "w") as f:
            f.write(text)
    return None


def run_tests(root: str, tests: list[str], timeout: float) -> tuple[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.path.join(root, 'adapters')}")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return "TIMEOUT", ""
    tail = out.decode(errors="replace").strip().splitlines()
    summary = tail[-1] if tail else ""
    failed = [ln.split(" - ")[0] for ln in tail if ln.startswith(("FAILED", "ERROR"))]
    if p.returncode == 0:
        return "MISSED", summary
    return "CAUGHT", (failed[0] if failed else summary)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default="", help="only mutations whose name contains this")
    ap.add_argument("--baseline", action="store_true")
    ap.add_argument("--timeout", type=float, default=900)
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    rows = []
    base = tempfile.mkdtemp(prefix="unickpt-mut-")
    try:
        if args.baseline:
            clean = os.path.join(base, "clean")
            copy_repo(clean)
            tests = sorted({t for m in chosen for t in m.tests})
            verdict, detail = run_tests(clean, tests, args.timeout)
            print(f"baseline: {'ok' if verdict == 'MISSED' else 'FAILING: ' + detail}",
                  flush=True)
        for i, m in enumerate(chosen):
            root = os.path.join(base, f"m{i}")
            copy_repo(root)
            t0 = time.monotonic()
            stale = apply(m, root)
            verdict, detail = ("STALE", stale) if stale else run_tests(root, m.tests,
                                                                       args.timeout)
            rows.append((m.name, verdict, detail, time.monotonic() - t0))
            print(f"{verdict:7s} {m.name}: {detail} ({rows[-1][3]:.0f}s)", flush=True)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("\n| mutation | result | first failing test / summary |\n|---|---|---|")
    for name, verdict, detail, _ in rows:
        print(f"| {name} | {verdict} | {detail} |")
    return 1 if any(v in ("MISSED", "STALE") for _, v, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
