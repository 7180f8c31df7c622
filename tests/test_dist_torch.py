"""Multi-process checkpoints with torch.distributed on CPU (gloo), ranks as subprocesses.

Every job runs in its own process group under a hard timeout (tests/_dist_launch.py): a hang
fails the test, it never stalls the suite.  What is checked, bit for bit, on every rank:

* DDP at world size 2 (dropout, AdamW, StepLR, DistributedSampler) killed as a whole job after
  a save, relaunched and killed in the middle of the next save, then relaunched, ends exactly
  where the uninterrupted run ends (parameters, optimizer state, per-rank RNG);
* FSDP2 at world size 2, the same; its checkpoint restores at world sizes 1 and 3 (into a
  plain model, or FSDP2 with other shard boundaries) with the gathered state equal bitwise;
* one rank killed alone mid-save: the other gets a CoordinationError naming the phase within
  the timeout, nothing is committed, a relaunch resumes the previous checkpoint.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("torch")

from _bitwise import assert_bitwise_equal  # noqa: E402
from _dist_launch import (  # noqa: E402
    assert_gathered_equal_saved,
    assert_rank_missed_report,
    launch,
)

import unickpt  # noqa: E402
from unickpt.format.reader import CheckpointReader  # noqa: E402

STEPS = 7


def job(tmp, name: str, mode: str = "ddp", world: int = 2, **kw) -> dict:
    return {"world": world, "root": str(tmp / name), "out": str(tmp / f"{name}.out"),
            "mode": mode, "steps": STEPS, "save_every": 2, "timeout": 20, **kw}


def finals(cfg: dict) -> list:
    return [unickpt.load(f"{cfg['out']}.r{r}") for r in range(cfg["world"])]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted runs (DDP and FSDP2 at world size 2), shared by the tests."""
    tmp = tmp_path_factory.mktemp("ref")
    out = {}
    for mode in ("ddp", "fsdp"):
        cfg = job(tmp, mode, mode)
        assert launch(cfg) == [0, 0]
        out[mode] = (cfg, finals(cfg))
    return out


def test_ddp_checkpoint_layout(reference):
    cfg, _ = reference["ddp"]
    with CheckpointReader(os.path.join(cfg["root"], "step_6")) as r:
        m = r.manifest
        assert [f.name for f in m.files] == ["arrays-r0.safetensors", "arrays-r1.safetensors"]
        assert m.info["distributed"] == {"world_size": 2, "per_rank": [["data"], ["rng"]]}
        by_file = {f.name: sum(a.nbytes for a in m.arrays if a.file == f.name)
                   for f in m.files}
        # replicated parameters/optimizer state written once, spread over both ranks
        names = [a.name for a in m.arrays]
        assert names.count("model/0.weight") == 1 and names.count("rng/torch/cpu") == 2
        assert min(by_file.values()) > 0.8 * max(by_file.values()), by_file
    tree = unickpt.load(os.path.join(cfg["root"], "step_6"))
    assert len(tree["rng"]) == 2 and len(tree["data"]) == 2
    # the two ranks' RNG states differ (dropout draws differ per rank)
    assert not np.array_equal(tree["rng"][0]["torch"]["cpu"], tree["rng"][1]["torch"]["cpu"])


AFTER_SAVE = {"step": 4, "phase": "after"}  # killed while training step 5
MID_SAVE = {"step": 6, "phase": "report"}  # killed with every rank's file of step 6 written


# DDP is killed after a save, then its resumed life in the middle of the next save (one job
# lives through both, one launch fewer than two separate jobs); one FSDP2 kill point keeps CI
# time down: mid-save is the harder one.
@pytest.mark.parametrize(("mode", "kills"), [("ddp", [AFTER_SAVE, MID_SAVE]), ("fsdp", [MID_SAVE])],
                         ids=["ddp-after-save-then-mid-save", "fsdp2-mid-save"])
def test_whole_job_killed_resumes_bitwise(tmp_path, reference, mode, kills):
    cfg = job(tmp_path, "run", mode)
    for kill in kills:
        assert launch({**cfg, "kill": {**kill, "ranks": [0, 1]}}) == [-9, -9], kill
        steps = sorted(int(n[5:]) for n in os.listdir(cfg["root"]) if n.startswith("step_"))
        assert steps == [2, 4], kill  # a save killed mid-way leaves nothing that looks committed
    assert launch(cfg) == [0, 0]
    for rank, (want, got) in enumerate(zip(reference[mode][1], finals(cfg))):
        assert_bitwise_equal(want, got, (f"rank {rank}",))


def test_one_rank_killed_mid_save(tmp_path):
    cfg = job(tmp_path, "run", kill={"step": 6, "phase": "report", "ranks": [1]})
    assert launch(cfg) == [3, -9]
    assert_rank_missed_report(cfg, step=6, missing=1)
    names = sorted(os.listdir(cfg["root"]))
    assert "step_6" not in names and "step_4" in names
    assert not [n for n in names if n.startswith(".unickpt-tmp")], names  # rank 0 cleaned up
    cfg.pop("kill")
    assert launch(cfg) == [0, 0]  # resumes step_4 and finishes
    assert unickpt.load(os.path.join(cfg["root"], "step_6"))["step"] == 6


@pytest.mark.parametrize(("source", "world"), [("fsdp", 1), ("fsdp", 3), ("ddp", 2)],
                         ids=["fsdp2-to-plain", "fsdp2-to-fsdp3", "ddp2-to-fsdp2"])
def test_restores_at_other_world_sizes_and_layouts(tmp_path, reference, source, world):
    """Restore mode builds FSDP2 at world > 1, a plain model at world 1."""
    ref_cfg, _ = reference[source]
    cfg = {**job(tmp_path, "restore", "restore", world), "root": ref_cfg["root"]}
    assert launch(cfg) == [0] * world
    for rank in range(world):
        got = unickpt.load(f"{cfg['out']}.r{rank}")
        assert got["step"] == 6
        if world != 2:
            assert "written by 2 processes and is restored by" in got["refused"]
            assert "rng" in got["refused"] and "data" in got["refused"]
        else:
            assert got["refused"] == ""  # same world size: per-rank state restores
        # the gathered parameters and optimizer state equal the saved ones, bit for bit;
        # the uninterrupted run trained to step 7, so compare with the checkpoint itself
        assert_gathered_equal_saved(unickpt.load(os.path.join(ref_cfg["root"], "step_6")),
                                    got)
