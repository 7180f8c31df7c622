"""The README's code blocks run as written (each in a fresh interpreter, in a scratch cwd).

Blocks that are fragments by nature (they need a server, the user's trainer or models) are
listed in ``FRAGMENTS`` with the reason; every other block must run, so a new example is
tested the day it is written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
with open(README) as _f:
    BLOCKS = re.findall(r"^```python\n(.*?)^```", _f.read(), flags=re.S | re.M)
# a substring of each fragment -> why it cannot run alone
FRAGMENTS = {
    'CheckpointManager("s3://bucket': "needs an S3 endpoint (tests/test_storage_s3.py runs it)",
    "assert_resume_deterministic(train": "the user's own trainer (docs/testing.md runs one)",
    "unickpt.migrate(": "needs the user's models (examples/migrate_torch_to_flax.py runs one)",
}


def _fragment(block: str) -> str | None:
    return next((why for key, why in FRAGMENTS.items() if key in block), None)


def test_every_fragment_is_still_in_the_readme():
    assert sorted(filter(None, map(_fragment, BLOCKS))) == sorted(FRAGMENTS.values())


@pytest.mark.parametrize("i", [i for i, b in enumerate(BLOCKS) if _fragment(b) is None])
def test_readme_block_runs_as_written(i, tmp_path):
    p = subprocess.run([sys.executable, "-W", "error", "-c", BLOCKS[i]], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"README block {i}:\n{BLOCKS[i]}\n{p.stderr[-3000:]}"
