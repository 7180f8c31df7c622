"""The machine's write bound: the fastest durable write of N bytes this machine achieves.

A single-threaded ``os.write`` + ``fsync`` is not a bound (unickpt beats it by overlapping
copying with writeback), so every method below writes the same number of bytes, durably
(``fsync`` inside the timed region), and the bound is the best time of any of them:

- ``buffered xT``: T threads ``pwrite`` disjoint 16 MiB chunks of one file, then ``fsync``.
- ``O_DIRECT xT``: the same with ``O_DIRECT`` (page-aligned buffers; skipped where the
  filesystem refuses it, e.g. tmpfs), which bypasses the page cache copy.
- ``dd``/``fio``: the system tools, where installed (``dd bs=16M oflag=direct conv=fsync``).

The data are random bytes (incompressible), generated once, untimed.
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable

import numpy as np

CHUNK = 16 << 20


def _aligned(nbytes: int) -> mmap.mmap:
    """A page-aligned buffer of random bytes (anonymous mmap: O_DIRECT needs alignment)."""
    buf = mmap.mmap(-1, nbytes)
    rnd = np.random.default_rng(7).integers(0, 256, nbytes, dtype=np.uint8)
    buf.write(rnd.tobytes())
    return buf


def _threaded(path: str, buf: mmap.mmap, nbytes: int, threads: int, direct: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        os.ftruncate(fd, nbytes)
        offsets = list(range(0, nbytes, CHUNK))
        lock = threading.Lock()
        errors: list[BaseException] = []
        view = memoryview(buf)

        def work() -> None:
            try:
                while True:
                    with lock:
                        if not offsets:
                            return
                        off = offsets.pop()
                    mv = view[off % len(buf):off % len(buf) + min(CHUNK, nbytes - off)]
                    done = 0
                    while done < len(mv):
                        done += os.pwrite(fd, mv[done:], off + done)
            except BaseException as e:  # report in the caller, not lost in a thread
                errors.append(e)

        ts = [threading.Thread(target=work) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        view.release()
        if errors:
            raise errors[0]
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _dd(path: str, nbytes: int) -> None:
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={nbytes // CHUNK}",
                    "oflag=direct", "conv=fsync"], check=True, capture_output=True, timeout=300)


def _fio(path: str, nbytes: int) -> None:
    subprocess.run(["fio", "--name=bound", f"--filename={path}", "--rw=write", "--bs=16M",
                    f"--size={nbytes}", "--direct=1", "--numjobs=1", "--iodepth=16",
                    "--ioengine=libaio", "--end_fsync=1", "--refill_buffers"],
                   check=True, capture_output=True, timeout=300)


def measure(workdir: str, nbytes: int, repeats: int, log: Callable[[str], None]) -> dict:
    """Best and median time of each method writing ``nbytes`` into ``workdir`` durably."""
    nbytes = max(CHUNK, nbytes // CHUNK * CHUNK)
    buf = _aligned(min(nbytes, 256 << 20))  # chunks reuse a 256 MiB source: no 1 GiB extra
    path = os.path.join(workdir, "bound.bin")
    cpus = os.cpu_count() or 1
    methods: dict[str, Callable[[], None]] = {}
    for t in sorted({1, 2, 4, cpus}):
        methods[f"buffered x{t}"] = lambda t=t: _threaded(path, buf, nbytes, t, False)
    try:  # O_DIRECT where the filesystem allows it
        _threaded(path, buf, CHUNK, 1, True)
        for t in sorted({1, 2, 4, cpus}):
            methods[f"O_DIRECT x{t}"] = lambda t=t: _threaded(path, buf, nbytes, t, True)
    except OSError as e:
        log(f"  write bound: O_DIRECT refused here ({e.strerror}); buffered only")
    if shutil.which("dd"):
        methods["dd oflag=direct"] = lambda: _dd(path, nbytes)
    if shutil.which("fio"):
        methods["fio direct iodepth=16"] = lambda: _fio(path, nbytes)
    times: dict[str, list[float]] = {m: [] for m in methods}
    try:
        for _ in range(repeats):
            for m, fn in methods.items():
                t0 = time.perf_counter()
                try:
                    fn()
                except (OSError, subprocess.SubprocessError) as e:
                    log(f"  write bound: {m} failed ({e}); left out")
                    times[m].append(float("inf"))
                    continue
                times[m].append(time.perf_counter() - t0)
                os.remove(path)
    finally:
        buf.close()
        if os.path.exists(path):
            os.remove(path)
    times = {m: v for m, v in times.items() if min(v) < float("inf")}
    best = min(times, key=lambda m: min(times[m]))
    log(f"  write bound ({nbytes / 2**20:.0f} MiB): " + ", ".join(
        f"{m} {min(v):.3f}s" for m, v in times.items()) + f"; best: {best}")
    return {"bytes": nbytes, "times": times, "best_method": best,
            "best_s": min(times[best]), "best_gbs": nbytes / 1e9 / min(times[best])}
