"""One rank of tests/_dist_worker.py's job with its run root on an object store (test helper).

The config adds ``storage_options`` (given to every CheckpointManager) and an optional
``kill_upload``: ``{"step": S, "ranks": [..]}`` SIGKILLs the listed ranks in the middle of
uploading their array file of step S (the upload started, the object not complete).  It
also counts, per rank, the bytes this process read from array files (``{out}.r{rank}.reads``),
so a test can check that a restore reads only its own regions.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))

import _dist_worker as worker  # noqa: E402
import torch  # noqa: E402

import unickpt  # noqa: E402
from unickpt.storage import objio, objstore  # noqa: E402


def patch(cfg: dict, rank: int) -> None:
    opts = cfg.get("storage_options")
    real = unickpt.CheckpointManager

    class Manager(real):  # type: ignore[misc, valid-type]
        def __init__(self, root: Any, **kw: Any):
            super().__init__(root, storage_options=opts, **kw)

    unickpt.CheckpointManager = Manager  # type: ignore[misc]
    kill = cfg.get("kill_upload")
    if kill and rank in kill["ranks"]:
        sync = objio.PartUploader.sync

        def dying_sync(self: objio.PartUploader) -> None:
            if f"step_{kill['step']}" in self.key and "arrays-r" in self.key:
                # mid-upload: a multipart upload begun, one part sent, never completed
                self._start()
                self._call("upload_part", UploadId=self._upload_id, PartNumber=1,
                           Body=b"x" * 1024)
                os.kill(os.getpid(), signal.SIGKILL)
            sync(self)

        objio.PartUploader.sync = dying_sync  # type: ignore[method-assign]
    read = objio.RangedReader._read
    counts = {"bytes": 0, "files": {}}

    def counting(self: objio.RangedReader, buf: Any, offset: int, n: int) -> int:
        got = read(self, buf, offset, n)
        name = self.path.rsplit("/", 1)[-1]
        if name.startswith("arrays-r"):
            counts["bytes"] += got
            counts["files"][name] = counts["files"].get(name, 0) + got
        return got

    objio.RangedReader._read = counting  # type: ignore[method-assign]
    # The opening GET of an object fetches its first HEAD_BYTES (256 KiB) with its size: a
    # whole small file.  Fetch only the 8-byte length prefix with it here, so that what a
    # rank reads of the (small) files in the test shows which regions it asked for.
    objstore.HEAD_BYTES = 8
    first = objstore.FsspecStorage._first_range

    def counted_first(self: objstore.FsspecStorage, path: str) -> tuple[int, bytes]:
        size, head = first(self, path)
        name = path.rsplit("/", 1)[-1]
        if name.startswith("arrays-r"):
            counts["bytes"] += len(head)
            counts["files"][name] = counts["files"].get(name, 0) + len(head)
        return size, head

    objstore.FsspecStorage._first_range = counted_first  # type: ignore[method-assign]

    def report() -> None:  # a finished rank: what it read (its restore; saves read none)
        with open(f"{cfg['out']}.r{rank}.reads", "w") as f:
            json.dump(counts, f)

    atexit.register(report)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    config, r = json.loads(sys.argv[1]), int(sys.argv[2])
    patch(config, r)
    worker.run(config, r)
