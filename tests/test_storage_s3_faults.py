"""Faults on a real S3 server (SeaweedFS): the writer SIGKILLed at random points of its saves,
the server killed mid-save and mid-restore, two writer processes on one root, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import unickpt
from unickpt.errors import LockedError
from unickpt.manager import RunRoot
from unickpt.storage import storage_for

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
TRIALS = int(os.environ.get("UNICKPT_S3_KILL_TRIALS", "6" if IN_CI else "50"))
HERE = os.path.dirname(os.path.abspath(__file__))


def state(step: int) -> dict:
    """12 MiB: three 5 MiB parts of a multipart upload (the writer shrinks the part size)."""
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal(3 << 20).astype(np.float32),
            "b": rng.integers(0, 9, 7, dtype=np.int16), "step": step}


def same(a: dict, b: dict) -> bool:
    return (a["step"] == b["step"] and a["w"].tobytes() == b["w"].tobytes()
            and a["b"].tobytes() == b["b"].tobytes())


WRITER = r"""
import json, os, sys, time
sys.path.insert(0, os.environ["TESTS_DIR"])
import unickpt, unickpt.storage.objio as objio
from test_storage_s3_faults import state
objio.PART_BYTES = objio.MIN_PART_BYTES
url, opts = sys.argv[1], json.loads(sys.argv[2])
with unickpt.CheckpointManager(url, storage_options=opts, keep_last=2,
                               async_save=sys.argv[3] == "1") as m:
    r = m.restore(state(0))
    print("ready", r.step, flush=True)
    s = r.step
    while True:
        s += 1
        m.save(s, state(s))
"""


def spawn_writer(url: str, opts: dict, async_save: bool = False) -> subprocess.Popen:
    env = dict(os.environ, TESTS_DIR=HERE)
    p = subprocess.Popen([sys.executable, "-c", WRITER, url, json.dumps(opts),
                          "1" if async_save else "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, start_new_session=True, text=True)
    line = p.stdout.readline()
    if not line.startswith("ready"):
        p.kill()
        raise AssertionError(f"writer did not start: {line!r} {p.stderr.read()[-3000:]}")
    return p


def kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)
    p.stdout.close()
    p.stderr.close()


def check_resume(url: str, opts: dict) -> int:
    """The newest committed step resumes bitwise, and no leftover survives the start."""
    st = storage_for(url, opts)
    with unickpt.CheckpointManager(url, storage=st, keep_last=2) as m:
        r = m.restore(state(0))
        listing = RunRoot(url, st).scan()
        assert listing.temps == () and listing.trash == () and listing.uncommitted == (), listing
    if r.resumed:
        assert same(r.state, state(r.step)), f"wrong resume of step {r.step}"
    return r.step


@settings(max_examples=TRIALS, deadline=None, derandomize=IN_CI,
          suppress_health_check=list(HealthCheck))
@given(delay=hs.floats(0.0, 2.5), async_save=hs.booleans())
def test_sigkill_writer_never_wrong_resume(s3_root, delay, async_save):
    url, opts = s3_root
    before = check_resume(url, opts)
    p = spawn_writer(url, opts, async_save)
    time.sleep(delay)
    kill(p)
    after = check_resume(url, opts)
    assert after >= before


def test_two_writer_processes_second_fails_fast(s3_root):
    url, opts = s3_root
    p = spawn_writer(url, opts)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockedError, match=r"locked by another CheckpointManager \(pid="
                                              f"{p.pid} "):
            unickpt.CheckpointManager(url, storage_options=opts).resolve_start()
        assert time.monotonic() - t0 < 5
    finally:
        kill(p)


def test_cli_on_s3_urls(s3_root, monkeypatch, capsys):
    from unickpt.cli import main

    url, opts = s3_root
    with unickpt.CheckpointManager(url, storage_options=opts) as m:
        m.save(1, state(1))
        m.save(2, state(2))
    monkeypatch.setenv("AWS_ENDPOINT_URL", opts["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", opts["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", opts["secret"])
    assert main(["ls", url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in out["checkpoints"]] == [1, 2]
    assert main(["verify", url + "/step_2"]) == 0
    assert capsys.readouterr().out.startswith(f"OK {url}/step_2: 2 arrays, 12.0 MiB verified")
    assert main(["inspect", url + "/step_2", "--json"]) == 0
    ins = json.loads(capsys.readouterr().out)
    assert [f["ok"] for f in ins["files"]] == [True, True]
    assert main(["diff", url + "/step_1", url + "/step_2"]) == 1
    assert "w" in capsys.readouterr().out


def test_cli_progress_counts_downloaded_bytes(s3_root, monkeypatch, capsys):
    """verify and diff on s3:// URLs show a byte bar fed by the object-store reader (forced
    on with UNICKPT_PROGRESS=1, since stderr is not a terminal here); -q and =0 hide it."""
    from unickpt.cli import main

    url, opts = s3_root
    st = storage_for(url, opts)
    for s in (1, 2):
        unickpt.save(f"{url}/ck{s}", state(s), storage=st)
    size = sum(st.tree_size(f"{url}/ck{s}") for s in (1, 2)) - sum(
        len(st.read_bytes(f"{url}/ck{s}/manifest.msgpack")) for s in (1, 2))
    assert 12 << 20 < size // 2 < (12 << 20) + 4096  # the two array files
    monkeypatch.setenv("AWS_ENDPOINT_URL", opts["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", opts["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", opts["secret"])
    monkeypatch.setenv("UNICKPT_PROGRESS", "1")
    counted: list[int] = []
    from unickpt.storage import objio

    with objio.observe_reads(counted.append):
        assert main(["verify", url + "/ck2"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"OK {url}/ck2: 2 arrays, 12.0 MiB verified")
    # every byte of the array file, once (+ the manifest and the header checks: < 2 KiB)
    assert size // 2 <= sum(counted) < size // 2 + 2048, (counted, size)
    assert "verifying" in err and "12.0/12.0 MiB" in err, err[-400:]
    assert main(["diff", url + "/ck1", url + "/ck2"]) == 1
    err = capsys.readouterr().err
    assert "reading" in err and "24.0/24.0 MiB" in err, err[-400:]
    assert main(["verify", "-q", url + "/ck2"]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("UNICKPT_PROGRESS", "0")
    assert main(["diff", url + "/ck1", url + "/ck2"]) == 1
    assert capsys.readouterr().err == ""


def test_server_killed_mid_save_and_mid_restore(seaweed, s3_root):
    """The store vanishes: typed errors naming the URL within the timeouts, nothing
    committed; after a restart the previous checkpoint resumes bitwise."""
    url, opts = s3_root
    with unickpt.CheckpointManager(url, storage_options=opts) as m:
        m.save(1, state(1))
    big = {"w": np.random.default_rng(5).standard_normal(24 << 20).astype(np.float32),
           "step": 2}  # 96 MiB: the server dies while it uploads
    m = unickpt.CheckpointManager(url, storage_options=opts)
    m.resolve_start()
    import threading
    threading.Timer(0.3, seaweed.stop).start()
    t0 = time.monotonic()
    with pytest.raises(OSError, match=r"while saving s3://.*/step_2: nothing was committed"):
        m.save(2, big)
    assert time.monotonic() - t0 < 120
    with pytest.raises(unickpt.errors.UnickptError, match="s3://"):
        unickpt.load(url + "/step_1", storage=storage_for(url, opts))
    seaweed.start()
    m.close()
    with unickpt.CheckpointManager(url, storage_options=opts) as m2:
        r = m2.restore(state(0))
        assert r.step == 1 and same(r.state, state(1))
    # mid-restore: the server dies while the (big) step 3 is being read
    with unickpt.CheckpointManager(url, storage_options=opts) as m3:
        m3.save(3, big)
    threading.Timer(0.2, seaweed.stop).start()
    with pytest.raises(unickpt.errors.UnickptError, match="s3://"):
        for _ in range(50):
            unickpt.load(url + "/step_3", storage=storage_for(url, opts))
    seaweed.start()
    got = unickpt.load(url + "/step_3", storage=storage_for(url, opts))
    assert got["w"].tobytes() == big["w"].tobytes()
