"""Multi-process checkpoints (torch.distributed, gloo, 2 ranks) on a real S3 server.

Every rank uploads its own array file (multipart, straight under the checkpoint's prefix);
rank 0 uploads the manifest, the commit object, once every rank reported its upload done.
Checked against SeaweedFS (tests/_seaweed.py), bit for bit:

* an FSDP2 job on an ``s3://`` root: its checkpoint layout, and a restore at world size 1
  (plain model) equal to the saved state;
* one rank SIGKILLed in the middle of uploading its file: the other gets a typed
  CoordinationError naming the phase, nothing is committed or left behind, and a relaunch
  resumes the previous checkpoint and ends exactly where the uninterrupted run ends, each
  rank reading only its own shards of the other rank's file (ranged reads).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("s3fs")

import _dist_launch  # noqa: E402
from _bitwise import assert_bitwise_equal  # noqa: E402

import unickpt  # noqa: E402
from unickpt.format.reader import CheckpointReader  # noqa: E402
from unickpt.storage import storage_for  # noqa: E402

STEPS = 7
S3_WORKER = _dist_launch.WORKER.replace("_dist_worker.py", "_dist_s3_worker.py")


def launch(cfg: dict) -> list[int]:
    return _dist_launch.launch(cfg, timeout=90, worker=S3_WORKER)


def job(tmp, url: str, opts: dict, mode: str = "fsdp", world: int = 2, **kw) -> dict:
    opts = {k: v for k, v in opts.items() if k != "skip_instance_cache"}
    return {"world": world, "root": url, "out": str(tmp / f"{mode}{world}.out"), "mode": mode,
            "steps": STEPS, "save_every": 2, "timeout": 10, "storage_options": opts, **kw}


def finals(cfg: dict) -> list:
    return [unickpt.load(f"{cfg['out']}.r{r}") for r in range(cfg["world"])]


def reads(cfg: dict, rank: int) -> dict:
    with open(f"{cfg['out']}.r{rank}.reads") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, seaweed):
    """The uninterrupted FSDP2 run at world size 2 on an s3:// root."""
    import uuid

    fs = seaweed.fs()
    if not fs.exists("unickpt-tests"):
        fs.mkdir("unickpt-tests")
    url = f"s3://unickpt-tests/dist-{uuid.uuid4().hex[:10]}"
    cfg = job(tmp_path_factory.mktemp("ref"), url, seaweed.options())
    assert launch(cfg) == [0, 0]
    return cfg, finals(cfg)


def test_fsdp2_on_s3_layout_and_restore_at_world_size_1(tmp_path, reference):
    ref, _ = reference
    opts = ref["storage_options"]
    st = storage_for(ref["root"], opts)
    root = st.resolve(ref["root"])
    assert st.list_dir(root) == ["latest", "step_4", "step_6"]  # no staging, lock released
    ck = root + "/step_6"
    with CheckpointReader(ck, st) as r:
        m = r.manifest
        assert [f.name for f in m.files] == ["arrays-r0.safetensors", "arrays-r1.safetensors"]
        assert m.info["distributed"]["world_size"] == 2
        assert m.sharded, "FSDP2 parameters are saved as sharded arrays"
    assert sorted(st.list_dir(ck)) == ["arrays-r0.safetensors", "arrays-r1.safetensors",
                                       "manifest.msgpack"]
    cfg = {**job(tmp_path, ref["root"], opts, "restore", 1)}
    assert launch(cfg) == [0]
    got = unickpt.load(f"{cfg['out']}.r0")
    assert got["step"] == 6 and "written by 2 processes and is restored by 1" in got["refused"]
    _dist_launch.assert_gathered_equal_saved(unickpt.load(ck, storage=st), got)


def test_rank_killed_mid_upload_nothing_committed_then_resumes(tmp_path, reference, s3_root):
    url, opts = s3_root
    cfg = job(tmp_path, url, opts, kill_upload={"step": 6, "ranks": [1]})
    assert launch(cfg) == [3, -9]
    _dist_launch.assert_rank_missed_report(cfg, step=6, missing=1)
    st = storage_for(url, opts)
    root = st.resolve(url)
    # rank 0's own file of step 6 and the staging marker are gone: nothing to mistake.  The
    # lease of rank 0 (it exited without closing) is taken over by the relaunch (dead pid).
    assert st.list_dir(root) == [".unickpt.lock", "latest", "step_2", "step_4"]
    assert st.read_bytes(root + "/latest").strip() == b"step_4"
    cfg.pop("kill_upload")
    assert launch(cfg) == [0, 0]  # resumes step_4 and finishes
    for rank, (want, got) in enumerate(zip(reference[1], finals(cfg))):
        assert_bitwise_equal(want, got, (f"rank {rank}",))
    # the resume read each rank's own shards, not the other rank's: ranged reads
    with CheckpointReader(root + "/step_4", st) as r:
        m = r.manifest
        piece_bytes = {f.name: 0 for f in m.files}
        for s in m.sharded:
            for _idx, a in s.pieces:
                piece_bytes[m.arrays[a].file] += m.arrays[a].nbytes
        size = {f.name: f.size for f in m.files}
    for rank in range(2):
        other = f"arrays-r{1 - rank}.safetensors"
        assert piece_bytes[other] > 0
        got = reads(cfg, rank)["files"].get(other, 0)
        # all of it but the other rank's shards (+ the 8-byte length prefix, read twice);
        # a whole-file download would read size[other]
        assert 0 < got <= size[other] - piece_bytes[other] + 8, (rank, got, size, piece_bytes)
