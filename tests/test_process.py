"""Process liveness (unickpt.process) and the two rules built on it: a stale temporary entry
of this host is removed when its pid runs no process (a pid of 0 is garbage), while an
object-store lease is taken over early only when its holder is *known* dead (an unknown
holder keeps its lease until it expires)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid

import pytest

from unickpt.errors import LockedError
from unickpt.manager.run_root import temp_is_stale
from unickpt.process import holder_known_dead, pid_alive
from unickpt.storage import host_tag


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait(timeout=30)
    assert not pid_alive(child.pid)
    return child.pid


def test_pid_alive(dead_pid):
    assert pid_alive(os.getpid()) and pid_alive(os.getppid())
    assert not pid_alive(dead_pid)
    # 0 and negatives name no process (os.kill would signal a group, or everyone, and succeed)
    assert [pid_alive(p) for p in (0, -1, -os.getpid())] == [False, False, False]
    assert not pid_alive(1 << 62)  # beyond any pid: not an OverflowError


def test_holder_known_dead(dead_pid):
    me = socket.gethostname()
    assert holder_known_dead(me, dead_pid, this_host=me)
    assert not holder_known_dead(me, os.getpid(), this_host=me)
    # another host's pids cannot be checked here
    assert not holder_known_dead("elsewhere", dead_pid, this_host=me)
    # a missing or unusable pid names no holder that could be checked
    for pid in (None, 0, -1, str(dead_pid), float(dead_pid), True, [dead_pid]):
        assert not holder_known_dead(me, pid, this_host=me), pid


def test_temp_with_pid_zero_or_dead_is_stale_on_this_host(dead_pid):
    h = host_tag()
    name = ".unickpt-tmp.step_3.{}.{}.abcd1234"
    assert temp_is_stale(name.format(h, 0), age=1.0)  # never written by a live save
    assert temp_is_stale(name.format(h, dead_pid), age=1.0)
    assert not temp_is_stale(name.format(h, os.getpid()), age=1.0)  # this very process
    assert not temp_is_stale(name.format(h, os.getppid()), age=1.0)  # alive
    assert not temp_is_stale(name.format("otherhost", 0), age=1.0)  # another host: wait
    assert temp_is_stale(name.format("otherhost", 0), age=1e9)  # ... until it is old


@pytest.fixture
def lease_root():
    pytest.importorskip("fsspec")
    from unickpt.storage.objstore import FsspecStorage

    st = FsspecStorage(f"memory://lease-{uuid.uuid4().hex[:10]}")
    root = st.resolve(f"memory://lease-{uuid.uuid4().hex[:10]}/run")
    st.make_dirs(root)
    return st, root


def _take_over(st, root) -> None:
    """Acquire the lease (it must now hold this lock's token), then release it."""
    lock = st.lock(root)
    lock.acquire()
    try:
        assert json.loads(st.read_bytes(root + "/.unickpt.lock"))["token"] == lock.token
    finally:
        lock.release()


def _plant(st, root, body) -> None:
    st.write_atomic(root + "/.unickpt.lock",
                    body if isinstance(body, bytes) else json.dumps(body).encode())


@pytest.mark.parametrize("holder", [
    {"host": "{me}", "token": "x"},  # no pid
    {"host": "{me}", "pid": 0, "token": "x"},
    {"host": "{me}", "pid": -1, "token": "x"},
    {"host": "{me}", "pid": "garbage", "token": "x"},
    {"host": "elsewhere", "pid": "{dead}", "token": "x"},  # another host's pid: unknown
    {"pid": "{dead}", "token": "x"},  # no host
], ids=["no-pid", "pid-0", "pid-neg", "pid-str", "other-host", "no-host"])
def test_unknown_holder_keeps_its_lease_until_expiry(lease_root, dead_pid, holder):
    st, root = lease_root
    me = socket.gethostname()
    body = {k: (me if v == "{me}" else dead_pid if v == "{dead}" else v)
            for k, v in holder.items()}
    _plant(st, root, {**body, "expires": time.time() + 600})
    with pytest.raises(LockedError, match=f"run root {root} is locked by another"):
        st.lock(root).acquire()
    assert json.loads(st.read_bytes(root + "/.unickpt.lock"))["token"] == "x"  # untouched
    _plant(st, root, {**body, "expires": time.time() - 1})  # expired: taken over
    _take_over(st, root)


@pytest.mark.parametrize("body", [
    "dead",  # a dead process of this host: taken over before expiry
    b"[1, 2]", b"not json", {"host": "elsewhere", "pid": 1, "expires": "soon"},
], ids=["dead-pid", "json-list", "not-json", "bad-expiry"])
def test_dead_or_unreadable_lease_is_taken_over(lease_root, dead_pid, body):
    st, root = lease_root
    if body == "dead":
        body = {"host": socket.gethostname(), "pid": dead_pid, "token": "x",
                "expires": time.time() + 600}
    _plant(st, root, body)
    _take_over(st, root)
    assert not st.is_file(root + "/.unickpt.lock")
