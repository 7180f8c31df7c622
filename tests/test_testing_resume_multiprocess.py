"""assert_resume_deterministic on a 2-process DDP job (multiprocess_train).

The check has teeth: the same trainer without its per-rank RNG in the checkpoint fails, and
the report names the RNG and parameters of both ranks.  Each job runs its ranks in one process
group under a hard timeout.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("hypothesis")

from unickpt.testing import (  # noqa: E402
    JobFailedError,
    ResumeMismatchError,
    assert_resume_deterministic,
    multiprocess_train,
)


def test_a_correct_job_resumes_bitwise_on_every_rank():
    train = multiprocess_train("_resume_ranks:correct", world_size=2, timeout=120)
    assert assert_resume_deterministic(train, 4, interruptions=[2],
                                       check_reference=False) == [(2,)]


def test_a_job_that_forgets_per_rank_rng_fails():
    train = multiprocess_train("_resume_ranks:forgets_rng", world_size=2, timeout=120)
    with pytest.raises(ResumeMismatchError) as e:
        assert_resume_deterministic(train, 4, interruptions=[2], check_reference=False)
    assert e.value.schedule == (2,)
    assert {"rank_0/rng", "rank_1/rng"} <= set(e.value.paths)
    assert any(p.startswith("rank_1/params/") for p in e.value.paths)


def test_a_failing_rank_is_reported_with_its_output(tmp_path):
    train = multiprocess_train("_resume_ranks:crashes", world_size=2, timeout=60)
    with pytest.raises(JobFailedError, match=r"(?s)on 2 ranks .* failed: exit codes .*"
                                             r"--- rank 1 \(exit 1\):\nrank 1 gave up"):
        train(str(tmp_path), 2)
