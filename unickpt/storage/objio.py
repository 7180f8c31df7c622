"""Byte movers for object stores (internal): parallel part uploads, ranged parallel reads.

:class:`PartUploader` turns the writer's ``pwrite`` calls (several threads, disjoint ranges,
any order) into an S3 multipart upload: the file is cut into fixed parts; a part is held in
memory only until all of its bytes have been written, then uploaded in the background, so
memory stays near ``(writer threads + uploads in flight) x part size`` instead of the whole
state.  Stores without a multipart API (:class:`SpoolUploader`) stream the file from a local
spool file at ``sync``.  :class:`RangedReader` serves ``pread_into`` with ranged GETs, split
into parallel pieces for big reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

from fsspec.asyn import sync

from ..errors import UnickptError

__all__ = ["ObjectStoreError", "PartUploader", "SpoolUploader", "RangedReader", "PART_BYTES",
           "MIN_PART_BYTES", "observe_reads"]

# Bodies go to aiohttp as the part's own bytearray, as s3fs sends its own chunks: no copy.
# (aiohttp emits a ResourceWarning for raw bodies over 1 MiB; only a hint about loop latency.)
PART_BYTES = 16 << 20
MIN_PART_BYTES = 5 << 20  # S3: every part but the last is at least 5 MiB
MAX_PARTS = 10_000
READ_PIECE = 16 << 20  # measured: bigger pieces beat more concurrency on small hosts
# Soft cap on parts held in memory (being filled or uploading).  A writer that needs a new
# part waits for room, but never longer than BACKPRESSURE_WAIT: a part shared by two arrays
# written by different threads completes only when both are written, so a hard cap could
# deadlock on adversarial write orders.
MAX_PARTS_IN_MEMORY = 24
BACKPRESSURE_WAIT = 5.0


_observers: list[Callable[[int], None]] = []


@contextlib.contextmanager
def observe_reads(callback: Callable[[int], None]) -> Iterator[None]:
    """Call ``callback(nbytes)`` for every piece any :class:`RangedReader` receives while
    the block runs (from the thread that received it): the CLI's progress bars count the
    bytes downloaded, as they arrive.

    >>> seen = []
    >>> with observe_reads(seen.append):
    ...     _received(5)
    >>> _received(7); seen
    [5]
    """
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


def _received(n: int) -> None:
    for cb in tuple(_observers):
        cb(n)


class ObjectStoreError(UnickptError, OSError):
    """An object store operation failed (after retries); the message names the URL."""


def _wrap(what: str, url: str, e: BaseException) -> BaseException:
    if isinstance(e, (FileNotFoundError, UnickptError)) or not isinstance(e, Exception):
        return e
    return ObjectStoreError(getattr(e, "errno", None) or 5,
                            f"object store: {what} {url} failed: {e}; check that the store "
                            "is reachable (nothing partial was committed)")


class PartUploader:
    """A WriteHandle over an S3 multipart upload of a ``size``-byte object (``size`` known
    up front, as the format writer gives it).  Small objects go up in one PUT at ``sync``."""

    def __init__(self, fs: Any, bucket: str, key: str, size: int, *, url: str,
                 part_bytes: int = PART_BYTES, extra: dict | None = None):
        self.fs, self.bucket, self.key, self.size, self.url = fs, bucket, key, size, url
        self.extra = extra or {}
        self.part = max(part_bytes, MIN_PART_BYTES, -(-size // MAX_PARTS))
        self.nparts = max(1, -(-size // self.part))
        self._bufs: dict[int, bytearray] = {}
        self._filled: dict[int, int] = {}
        self._futs: dict[int, Future] = {}
        self._cond = threading.Condition()
        self._upload_id: str | None = None
        self._done = False

    def _len(self, k: int) -> int:
        return min(self.part, self.size - k * self.part)

    def _call(self, method: str, **kw: Any) -> Any:
        return sync(self.fs.loop, self.fs._call_s3, method, Bucket=self.bucket, Key=self.key,
                    **kw)

    def _start(self) -> str:
        with self._cond:
            if self._upload_id is None:
                r = self._call("create_multipart_upload", **self.extra)
                self._upload_id = r["UploadId"]
            return self._upload_id

    def _buf(self, k: int) -> bytearray:
        with self._cond:
            if k not in self._bufs:
                # wait_for releases the lock: another writer of the same (shared) part may
                # create it meanwhile, so look again before creating it.
                self._cond.wait_for(lambda: k in self._bufs or
                                    len(self._bufs) < MAX_PARTS_IN_MEMORY, BACKPRESSURE_WAIT)
                if k not in self._bufs:
                    if k in self._futs:
                        raise RuntimeError(f"part {k + 1} of {self.url} written after upload")
                    self._bufs[k] = bytearray(self._len(k))
                    self._filled[k] = 0
                    self._cond.notify_all()
            return self._bufs[k]

    def _wrote(self, k: int, n: int) -> None:
        with self._cond:
            self._filled[k] += n
            full = self._filled[k] >= self._len(k) and self.nparts > 1
        if full:
            self._submit(k)

    def _submit(self, k: int) -> None:
        upload_id = self._start()
        buf = self._bufs[k]

        async def up() -> dict:
            r = await self.fs._call_s3("upload_part", Bucket=self.bucket, Key=self.key,
                                       UploadId=upload_id, PartNumber=k + 1,
                                       Body=buf)
            return {"PartNumber": k + 1, "ETag": r["ETag"]}

        fut = asyncio.run_coroutine_threadsafe(up(), self.fs.loop)

        def freed(_f: Future) -> None:  # the part's memory goes as soon as it is uploaded
            with self._cond:
                self._bufs.pop(k, None)
                self._cond.notify_all()

        fut.add_done_callback(freed)
        with self._cond:
            self._futs[k] = fut

    def pwrite(self, data: memoryview | bytes, offset: int) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            k = offset // self.part
            lo = offset - k * self.part
            n = min(len(mv), self._len(k) - lo)
            self._buf(k)[lo:lo + n] = mv[:n]
            self._wrote(k, n)
            offset += n
            mv = mv[n:]

    def pwritev(self, bufs: Sequence[memoryview | bytes], offset: int) -> None:
        for b in bufs:
            self.pwrite(b, offset)
            offset += len(b)

    def hint_written(self, offset: int, nbytes: int) -> None:
        pass  # parts go up as soon as they are complete

    def sync(self) -> None:
        """Upload what is left (zero-filled gaps included) and complete the upload: the
        object exists, whole, only after this returns."""
        if self._done:
            return
        try:
            self._finish()
        except Exception as e:
            self.abort()
            raise _wrap("uploading", self.url, e) from e

    def _finish(self) -> None:
        if self.nparts == 1:
            body = self._bufs.pop(0, None) or bytearray(self.size)
            self._call("put_object", Body=body, **self.extra)
            self._done = True
            return
        for k in range(self.nparts):
            with self._cond:
                pending = k not in self._futs
            if pending:
                self._buf(k)
                self._submit(k)
        parts = [self._futs[k].result() for k in range(self.nparts)]
        self._call("complete_multipart_upload", UploadId=self._start(),
                   MultipartUpload={"Parts": parts})
        self._done = True

    def abort(self) -> None:
        """Drop an unfinished multipart upload (its parts are invisible but use space)."""
        if self._upload_id is not None and not self._done:
            for f in self._futs.values():
                f.cancel()
            try:
                self._call("abort_multipart_upload", UploadId=self._upload_id)
            except Exception:  # noqa: BLE001
                pass  # the store's lifecycle rule or the next cleanup takes it
            self._done = True

    def close(self) -> None:
        self.abort()
        with self._cond:
            self._bufs.clear()


class SpoolUploader:
    """A WriteHandle for filesystems without multipart uploads: writes go to a local spool
    file (bounded memory), ``sync`` streams it to the store with ``put_file``."""

    def __init__(self, fs: Any, path: str, size: int,
                 put: Callable[[str], None] | None = None):
        self.fs, self.path = fs, path
        fd, self._spool = tempfile.mkstemp(prefix="unickpt-spool-")
        self.fd = fd
        os.ftruncate(fd, size)
        self._put = put

    def pwrite(self, data: memoryview | bytes, offset: int) -> None:
        mv = memoryview(data).cast("B")
        while len(mv):
            n = os.pwrite(self.fd, mv, offset)
            offset, mv = offset + n, mv[n:]

    def pwritev(self, bufs: Sequence[memoryview | bytes], offset: int) -> None:
        for b in bufs:
            self.pwrite(b, offset)
            offset += len(b)

    def hint_written(self, offset: int, nbytes: int) -> None:
        pass

    def sync(self) -> None:
        if self._put is not None:
            self._put(self._spool)
        else:
            self.fs.put_file(self._spool, self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            try:
                os.unlink(self._spool)
            except FileNotFoundError:
                pass


class RangedReader:
    """A ReadHandle over one object: ``pread_into`` issues ranged GETs (big reads split into
    parallel pieces on the filesystem's event loop); ``buffer`` reads the whole object."""

    def __init__(self, fs: Any, path: str, size: int, url: str | None = None,
                 head: bytes = b""):
        self.fs, self.path, self.size, self.url = fs, path, size, url or path
        self._async = getattr(fs, "async_impl", False)
        self._head = head  # the object's first bytes, fetched when it was opened
        self._s3 = hasattr(fs, "_call_s3")

    def pread_into(self, buf: memoryview, offset: int) -> int:
        n = max(0, min(len(buf), self.size - offset))
        if n == 0:
            return 0
        if offset + n <= len(self._head):  # no request: served from the opening GET
            memoryview(buf).cast("B")[:n] = memoryview(self._head)[offset:offset + n]
            _received(n)
            return n
        try:
            return self._read(buf, offset, n)
        except Exception as e:
            raise _wrap("reading", self.url, e) from e

    def _read(self, buf: memoryview, offset: int, n: int) -> int:
        out = memoryview(buf).cast("B")
        if not self._async:
            data = self.fs.cat_file(self.path, start=offset, end=offset + n)
            out[:len(data)] = data
            _received(len(data))
            return len(data)

        async def piece(lo: int, hi: int) -> int:
            if self._s3:
                with contextlib.suppress(Exception):  # else s3fs's own read (and retries)
                    return await self._stream_into(out, offset, lo, hi)
            data = await self.fs._cat_file(self.path, start=offset + lo, end=offset + hi)
            out[lo:lo + len(data)] = data
            _received(len(data))
            return len(data)

        async def run() -> list[int]:
            return await asyncio.gather(*(piece(lo, min(n, lo + READ_PIECE))
                                          for lo in range(0, n, READ_PIECE)))

        got = sync(self.fs.loop, run)
        return sum(got)

    async def _stream_into(self, out: memoryview, offset: int, lo: int, hi: int) -> int:
        """One ranged GET whose body goes straight into ``out[lo:hi]`` (no whole-piece
        bytes object, one copy fewer than ``cat_file``)."""
        bucket, _, key = self.path.partition("/")
        r = await self.fs._call_s3("get_object", Bucket=bucket, Key=key,
                                   Range=f"bytes={offset + lo}-{offset + hi - 1}")
        body, pos = r["Body"], lo
        try:
            while pos < hi:
                n = await body.readinto(out[pos:hi])
                if n <= 0:
                    break
                pos += n
        finally:
            body.close()
        if pos != hi:
            raise OSError(5, f"short read of {self.url}")
        _received(hi - lo)
        return hi - lo

    def buffer(self) -> memoryview:
        ba = bytearray(self.size)
        if self.size:
            self.pread_into(memoryview(ba), 0)
        return memoryview(ba).toreadonly()

    def close(self) -> None:
        pass
