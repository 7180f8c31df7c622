"""pytest plugin (entry point ``pytest11``): fixtures for resume-determinism tests.

Importing it needs only pytest; hypothesis is imported lazily by the checks themselves.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def unickpt_root(tmp_path):
    """A fresh, empty run root directory for a checkpointing test."""
    root = tmp_path / "run"
    root.mkdir()
    return root
