"""Object stores through fsspec (``s3://``, ``gs://``, ``memory://``, any fsspec URL).

Object stores have no rename, so a checkpoint is not staged and renamed: its data objects
are written directly under the final prefix, and the manifest, uploaded last with a
conditional create (``If-None-Match: *`` on S3), is the commit marker (docs/FORMAT.md,
"Object stores").  The staging location :meth:`make_temp_dir` returns is a small *pending
marker* object ``ROOT/.unickpt-tmp.<step>.<host>.<pid>.<rand>/pending`` naming the final
prefix: written before any data, it makes the data of a save that dies recognisable (the
stale-temp rule of the manager removes it together with the uncommitted data it names).

>>> st = FsspecStorage("memory://doc")
>>> root = st.resolve("memory://doc/run")
>>> tmp = st.make_temp_dir(root + "/step_1")
>>> h = st.create(tmp + "/manifest.msgpack", 2); h.pwrite(b"hi", 0); h.sync(); h.close()
>>> st.is_file(root + "/step_1/manifest.msgpack")
False
>>> st.commit(tmp, root + "/step_1"); st.read_bytes(root + "/step_1/manifest.msgpack")
b'hi'
>>> st.list_dir(root)
['step_1']
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointExistsError, LockedError, RunRootError, UnickptError
from ..process import holder_known_dead
from .objio import ObjectStoreError, PartUploader, RangedReader, SpoolUploader
from .protocol import LOCK_NAME, parse_temp_name, temp_name

__all__ = ["FsspecStorage", "LeaseLock", "ObjectStoreError", "PENDING_NAME", "MANIFEST"]

PENDING_NAME = "pending"
MANIFEST = "manifest.msgpack"  # the commit marker (unickpt.format.manifest.MANIFEST_NAME)
LEASE_SECONDS = 60.0
HEAD_BYTES = 256 << 10  # what ``open`` fetches with the size (a manifest is usually less)


@dataclass
class _Staging:
    final: str
    direct: bool  # data written under ``final`` (else under the temp prefix, copied at commit)
    manifest: bytes | None = None


class _ManifestHandle:
    """The manifest of a staged checkpoint: kept in memory, uploaded by ``commit``."""

    def __init__(self, st: _Staging, size: int):
        self.st, self.buf = st, bytearray(size)

    def pwrite(self, data: Any, offset: int) -> None:
        mv = memoryview(data).cast("B")
        self.buf[offset:offset + len(mv)] = mv

    def pwritev(self, bufs: Any, offset: int) -> None:
        for b in bufs:
            self.pwrite(b, offset)
            offset += len(b)

    def hint_written(self, offset: int, nbytes: int) -> None:
        pass

    def sync(self) -> None:
        self.st.manifest = bytes(self.buf)

    def close(self) -> None:
        pass


class FsspecStorage:
    """A :class:`~unickpt.storage.Storage` on an fsspec filesystem (see module docs).

    ``url`` is any path of the store (its protocol picks the filesystem);
    ``storage_options`` go to the filesystem (``endpoint_url``, credentials...).
    """

    #: No zero-copy whole-file map here (``buffer`` downloads the object): readers that
    #: need only some arrays use ranged reads instead.
    maps_files = False

    def __init__(self, url: str, storage_options: dict | None = None, *, fs: Any = None):
        import fsspec

        protocol = url.split("://", 1)[0] if "://" in url else "file"
        opts = dict(storage_options or {})
        if protocol in ("s3", "s3a"):
            # listings must be the truth, never a cache; bounded waits for a vanished server
            opts.setdefault("use_listings_cache", False)
            ck = dict(opts.pop("config_kwargs", {}) or {})
            ck.setdefault("connect_timeout", 5)
            ck.setdefault("read_timeout", 60)
            ck.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
            opts["config_kwargs"] = ck
        self.fs = fs if fs is not None else fsspec.filesystem(protocol, **opts)
        if protocol in ("s3", "s3a") and fs is None and hasattr(self.fs, "retries"):
            # s3fs retries transient errors with backoff (about 1 s in all at 3 tries);
            # botocore adds its own.  A dead endpoint fails in seconds, not minutes.
            self.fs.retries = min(self.fs.retries, 3)
        self.protocol = protocol
        self._s3 = protocol in ("s3", "s3a") and hasattr(self.fs, "_call_s3")
        self._staging: dict[str, _Staging] = {}  # the stagings this process commits
        self._foreign: dict[str, _Staging] = {}  # other processes' (multi-process saves)
        self._mu = threading.Lock()

    # ------------------------------------------------------------ paths and errors
    def _key(self, path: str) -> str:
        return self.fs._strip_protocol(path).rstrip("/") or "/"

    def _url(self, key: str) -> str:
        return f"{self.protocol}://{key}"

    def _bucket_key(self, path: str) -> tuple[str, str]:
        b, _, k = self._key(path).partition("/")
        return b, k

    def _err(self, what: str, path: str, e: Exception) -> Exception:
        """A typed error naming the URL (botocore raises some errors, e.g. a refused
        connection, as non-OSError exceptions: they are wrapped too)."""
        if isinstance(e, (FileNotFoundError, FileExistsError, UnickptError)):
            return e
        return ObjectStoreError(getattr(e, "errno", None) or 5,
                                f"object store: {what} {path} failed: {e}; check that the "
                                "store is reachable")

    def resolve(self, path: str | os.PathLike) -> str:
        return self._url(self._key(os.fspath(path)))

    # ------------------------------------------------------------ looking
    def _ls(self, path: str, detail: bool = False) -> list:
        key = self._key(path)
        try:
            entries = self.fs.ls(key, detail=True, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except Exception as e:
            raise self._err("listing", path, e) from e
        # A "key/" object of the listed prefix itself is a directory marker (stores with real
        # directories show one after the prefix's objects are deleted), not content.
        entries = [e for e in entries if not (str(e.get("name", "")).endswith("/") and
                                              str(e["name"]).rstrip("/") == key)]
        return entries if detail else [e["name"] for e in entries]

    def list_dir(self, path: str) -> list[str]:
        base = self._key(path)
        out = {posixpath.basename(str(p).rstrip("/")) for p in self._ls(path)}
        return sorted(n for n in out if n and posixpath.join(base, n) != base)

    def _info(self, path: str) -> dict | None:
        try:
            return self.fs.info(self._key(path), refresh=True)
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._err("stat of", path, e) from e

    def is_dir(self, path: str) -> bool:
        # A prefix exists while objects are under it; an empty directory entry that some
        # stores keep (SeaweedFS) after its objects are deleted does not count.  One LIST:
        # listing an object's own key returns just that object.
        key = self._key(path)
        entries = self._ls(path, True)
        return bool(entries) and not (len(entries) == 1 and entries[0].get("type") == "file"
                                      and str(entries[0].get("name")).rstrip("/") == key)

    def is_file(self, path: str) -> bool:
        i = self._info(path)
        return i is not None and i.get("type") == "file"

    def exists(self, path: str) -> bool:
        return bool(self._ls(path))  # the object itself, or a prefix with objects

    def make_dirs(self, path: str) -> None:
        try:
            self.fs.makedirs(self._key(path), exist_ok=True)
        except FileExistsError:
            pass
        except Exception as e:
            raise self._err("creating", path, e) from e

    def tree_size(self, path: str) -> int:
        return sum(int(e.get("size") or 0) for e in self._ls(path, True)
                   if e.get("type") == "file")

    def mtime(self, path: str) -> float:
        i = self._info(path)
        if i is None:
            raise FileNotFoundError(2, "no such object or prefix", path)
        if i.get("type") == "file":
            return self._file_mtime(i, path)
        times = [self._file_mtime(e, path) for e in self._ls(path, True)
                 if e.get("type") == "file"]
        # An empty directory entry (kept by stores with real directories after a delete
        # that died half-way): as old as can be, so the stale rule lets a cleaner remove it.
        return max(times, default=0.0)

    def _file_mtime(self, info: dict, path: str) -> float:
        for k in ("LastModified", "mtime", "created", "updated"):
            v = info.get(k)
            if v is not None:
                return v.timestamp() if hasattr(v, "timestamp") else float(v)
        return self.fs.modified(info["name"]).timestamp()

    # ------------------------------------------------------------ small objects
    def read_bytes(self, path: str) -> bytes:
        if self._s3:  # small objects (pointer, lease, markers): one GET, no HEAD first
            try:
                size, head = self._first_range(path)
                if size <= len(head):
                    return head
            except FileNotFoundError:
                raise
            except Exception:  # noqa: BLE001 - empty, or any doubt: the plain way below
                pass
        try:
            return self.fs.cat_file(self._key(path))
        except FileNotFoundError:
            raise
        except Exception as e:
            raise self._err("reading", path, e) from e

    def _parents(self, key: str) -> None:
        """Filesystems with real directories (``file://``) need the parent made first."""
        if not self._s3:
            with contextlib.suppress(FileExistsError):
                self.fs.makedirs(posixpath.dirname(key), exist_ok=True)

    def _put(self, path: str, data: bytes) -> None:
        try:
            self._parents(self._key(path))
            self.fs.pipe_file(self._key(path), data)
        except Exception as e:
            raise self._err("writing", path, e) from e

    def put_if_absent(self, path: str, data: bytes) -> bool:
        """Create ``path`` only if nothing is there; False if something is.  Atomic on S3
        (``If-None-Match: *``); check-then-put elsewhere (see docs/storage.md, limits)."""
        if self._s3:
            from fsspec.asyn import sync
            bucket, key = self._bucket_key(path)
            try:
                sync(self.fs.loop, self.fs._call_s3, "put_object", Bucket=bucket, Key=key,
                     Body=io.BytesIO(data), IfNoneMatch="*")
                return True
            except Exception as e:
                code = getattr(getattr(e, "__cause__", None), "response", {}) \
                    .get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "ConditionalRequestConflict") \
                        or "pre-condition" in str(e).lower():
                    return False
                raise self._err("writing", path, e) from e
        with self._mu:
            if self.exists(path):
                return False
            self._put(path, data)
            return True

    def write_atomic(self, path: str, data: bytes) -> None:
        self._put(path, data)  # one PUT is atomic on object stores

    def remove_file(self, path: str) -> None:
        try:
            self.fs.rm_file(self._key(path))
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._err("deleting", path, e) from e

    # ------------------------------------------------------------ staging and commit
    def make_temp_dir(self, final: str) -> str:
        final = self.resolve(final)
        tmp = temp_name(final)
        # A prefix with objects under ``final`` (a committed checkpoint, to be replaced)
        # sends the data to the temp prefix and copies it at commit; else straight to final.
        direct = not self._ls(final)
        self._put(posixpath.join(tmp, PENDING_NAME), json.dumps(
            {"final": final, "direct": direct}).encode())
        with self._mu:
            self._staging[tmp] = _Staging(final, direct)
        return tmp

    def _pending(self, tmp: str) -> _Staging | None:
        with self._mu:
            st = self._staging.get(tmp)
        if st is not None:
            return st
        try:
            d = json.loads(self.read_bytes(posixpath.join(tmp, PENDING_NAME)))
            return _Staging(str(d["final"]), bool(d["direct"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _staging_of(self, parent: str) -> _Staging | None:
        """The staging ``parent`` names: made here, or (another process of a multi-process
        save writing into rank 0's staging) read once from its pending marker."""
        with self._mu:
            st = self._staging.get(parent) or self._foreign.get(parent)
        if st is None and parse_temp_name(posixpath.basename(parent)) is not None:
            st = self._pending(parent)
            if st is not None:
                with self._mu:  # a few recent ones: this process never commits them
                    st = self._foreign.setdefault(parent, st)
                    while len(self._foreign) > 8:
                        del self._foreign[next(iter(self._foreign))]
        return st

    def create(self, path: str, size: int = 0) -> Any:
        parent, name = posixpath.split(path)
        st = self._staging_of(parent)
        if st is not None:
            if name == MANIFEST:
                return _ManifestHandle(st, size)
            if st.direct:
                path = posixpath.join(st.final, name)
        elif self.exists(path):
            raise FileExistsError(17, "object exists", path)
        if self._s3:
            bucket, key = self._bucket_key(path)
            return PartUploader(self.fs, bucket, key, size, url=path)
        self._parents(self._key(path))
        return SpoolUploader(self.fs, self._key(path), size)

    def commit(self, temp: str, final: str, *, replace: bool = False) -> None:
        """Publish: (copy staged data), then create the manifest only if absent."""
        final = self.resolve(final)
        with self._mu:
            st = self._staging.get(temp)
        if st is None or st.manifest is None:
            raise ObjectStoreError(5, f"object store: {temp} is not a finished staging of "
                                      f"{final}; nothing was committed")
        marker = posixpath.join(final, MANIFEST)
        if not st.direct:
            if self.exists(marker):
                if not replace:
                    raise CheckpointExistsError(
                        f"{final} already exists; pass overwrite=True to replace it")
                self.remove_file(marker)  # uncommit first: never a mix of old and new
            for name in self.list_dir(final):
                self.remove_file(posixpath.join(final, name))
            for name in self.list_dir(temp):
                if name != PENDING_NAME:
                    self._copy(posixpath.join(temp, name), posixpath.join(final, name))
        if not self.put_if_absent(marker, st.manifest):
            raise CheckpointExistsError(f"{final} was committed by another writer meanwhile; "
                                        "this save was not committed")
        with self._mu:
            self._staging.pop(temp, None)
        with contextlib.suppress(OSError):
            self._rm_prefix(temp)

    def share(self, src: str, dst: str) -> bool:
        """Incremental saves (:class:`~unickpt.storage.protocol.Sharing`): ``dst`` becomes a
        server-side copy of the committed file ``src``; no byte passes through this host.

        A copy, not a reference: deleting ``src`` (retention) never touches ``dst``."""
        parent, name = posixpath.split(dst)
        st = self._staging_of(parent)
        if st is not None and st.direct:
            dst = posixpath.join(st.final, name)
        if self.exists(dst):
            raise FileExistsError(17, "object exists", dst)
        self._copy(src, dst)
        return True

    def _copy(self, src: str, dst: str) -> None:
        try:
            self._parents(self._key(dst))
            self.fs.copy(self._key(src), self._key(dst))  # server-side on S3 and GCS
        except Exception as e:
            raise self._err("copying", src, e) from e

    def _rm_prefix(self, path: str) -> None:
        try:
            self.fs.rm(self._key(path), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._err("deleting", path, e) from e
        if self._s3:  # stores with real directories (SeaweedFS) keep an empty "key/" entry
            from fsspec.asyn import sync
            bucket, key = self._bucket_key(path)
            with contextlib.suppress(Exception):
                sync(self.fs.loop, self.fs._call_s3, "delete_object", Bucket=bucket,
                     Key=key.rstrip("/") + "/")

    def remove_tree(self, path: str) -> None:
        """Delete ``path``; a staging or trash marker also takes the uncommitted data it
        names (never a committed checkpoint: that one has its manifest)."""
        if parse_temp_name(posixpath.basename(path)) is not None or \
                posixpath.basename(path).startswith(".unickpt-trash."):
            st = self._pending(path)
            if st is not None and st.direct and not self.exists(
                    posixpath.join(st.final, MANIFEST)):
                self._rm_prefix(st.final)
            with self._mu:
                self._staging.pop(path, None)
        self._rm_prefix(path)

    def move_many(self, pairs: list[tuple[str, str]]) -> None:
        """Archive: copy data, then the manifest (dst committed), then delete the source
        manifest first.  To trash: write a trash marker naming the source, then delete the
        source manifest (it is uncommitted from then on; ``remove_tree`` of the trash name
        deletes its data)."""
        for src, dst in pairs:
            if self.exists(dst):
                raise CheckpointExistsError(f"cannot move {src} to {dst}: the destination "
                                            "exists; move or delete it first")
        for src, dst in pairs:
            if posixpath.basename(dst).startswith(".unickpt-trash."):
                self._put(posixpath.join(dst, PENDING_NAME),
                          json.dumps({"final": src, "direct": True}).encode())
                self.remove_file(posixpath.join(src, MANIFEST))
                continue
            self._move_tree(src, dst)

    def _move_tree(self, src: str, dst: str) -> None:
        """Copy ``src`` to ``dst`` (each checkpoint's manifest last), then delete the source
        (its manifest first).  Recurses into checkpoints inside ``src`` (an archive's staging
        directory holds whole checkpoints)."""
        for name in sorted(self.list_dir(src), key=lambda n: n == MANIFEST):
            s, d = posixpath.join(src, name), posixpath.join(dst, name)
            if name != MANIFEST and self.is_dir(s):
                self._move_tree(s, d)
            else:
                self._copy(s, d)
        self.remove_file(posixpath.join(src, MANIFEST))
        self._rm_prefix(src)

    # ------------------------------------------------------------ reading and locking
    def open(self, path: str) -> RangedReader:
        if self._s3:  # one ranged GET: the size (Content-Range) and the object's first bytes
            with contextlib.suppress(Exception):  # else (missing, empty...) as below
                size, head = self._first_range(path)
                return RangedReader(self.fs, self._key(path), size, url=path, head=head)
        i = self._info(path)
        if i is None:
            raise FileNotFoundError(2, "no such object", path)
        if i.get("type") != "file":
            raise IsADirectoryError(21, "a prefix, not an object", path)
        return RangedReader(self.fs, self._key(path), int(i.get("size") or 0), url=path)

    def _first_range(self, path: str) -> tuple[int, bytes]:
        """``(size, the first HEAD_BYTES)`` of object ``path`` in one request: a reader's
        first reads (a manifest whole; an array file's length and header, often its small
        arrays) then cost no round trip of their own, and no HEAD is needed for the size."""
        from fsspec.asyn import sync
        bucket, key = self._bucket_key(path)

        async def get() -> tuple[int, bytes]:
            r = await self.fs._call_s3("get_object", Bucket=bucket, Key=key,
                                       Range=f"bytes=0-{HEAD_BYTES - 1}")
            try:
                data = await r["Body"].read()
            finally:
                r["Body"].close()
            total = str(r.get("ContentRange") or "").rpartition("/")[2]
            return (int(total) if total.isdigit() else len(data)), data

        size, data = sync(self.fs.loop, get)
        if size == 0 or len(data) != min(size, HEAD_BYTES) or key.endswith("/"):
            raise ValueError("unexpected ranged answer")
        return size, data

    def lock(self, root: str) -> LeaseLock:
        return LeaseLock(self, root)


def _expires(holder: dict) -> float:
    """When a lease ends; one that does not say (or not as a number) names no usable holder,
    like an unreadable lease, and is over."""
    try:
        return float(holder.get("expires", 0))
    except (TypeError, ValueError):
        return 0.0


class LeaseLock:
    """The writer lock of a run root on an object store: a lease object ``ROOT/.unickpt.lock``
    created only if absent, holding the holder, a token and an expiry, renewed by a daemon
    thread.  An expired lease, or one of a dead process on this host, is taken over."""

    def __init__(self, storage: FsspecStorage, root: str, ttl: float = LEASE_SECONDS):
        self.storage, self.root, self.ttl = storage, root, ttl
        self.path = posixpath.join(root, LOCK_NAME)
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "token": self.token, "expires": time.time() + self.ttl}).encode()

    def _holder(self) -> dict:
        try:
            h = json.loads(self.storage.read_bytes(self.path))
        except Exception:  # noqa: BLE001 - unreadable or gone: no holder we can name
            return {}
        return h if isinstance(h, dict) else {}

    def acquire(self) -> None:
        if self.token is not None:
            return
        self.token = uuid.uuid4().hex
        try:
            for _ in range(2):
                if self.storage.put_if_absent(self.path, self._body()):
                    break
                h = self._holder()
                # a holder we cannot check (no pid, another host) keeps its lease until expiry
                dead = holder_known_dead(h.get("host"), h.get("pid"), this_host=socket.gethostname())
                if dead or _expires(h) < time.time():
                    self.storage.remove_file(self.path)  # stale lease: take it over
                    continue
                raise LockedError(
                    f"run root {self.root} is locked by another CheckpointManager (pid="
                    f"{h.get('pid')} host={h.get('host')}, lease until "
                    f"{time.strftime('%H:%M:%S', time.gmtime(_expires(h)))}Z);"
                    " two writers in one root would corrupt its history. Stop the other job, "
                    "or give this one another root")
            else:
                raise LockedError(f"run root {self.root}: could not take the writer lease")
        except LockedError:
            self.token = None
            raise
        except OSError as e:
            self.token = None
            raise RunRootError(f"cannot take the writer lease {self.path}: {e}") from e
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, daemon=True,
                                        name="unickpt-lease")
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with contextlib.suppress(Exception):
                if self._holder().get("token") == self.token:
                    self.storage.write_atomic(self.path, self._body())

    def release(self) -> None:
        if self.token is None:
            return
        self._stop.set()
        with contextlib.suppress(Exception):  # best effort (also from a finalizer at exit)
            if self._holder().get("token") == self.token:
                self.storage.remove_file(self.path)
        self.token = None
