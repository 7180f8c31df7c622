"""How many schedules the examples' resume tests try in the project's own suite.

The two quickstart resume tests import :func:`unickpt_examples` from here (a conftest.py in
`examples/` would clash with `tests/conftest.py` under `--doctest-modules`).

Each schedule a hypothesis-driven check of a quickstart tries is one or two SIGKILLed
subprocesses plus a resume (a torch or Flax import apiece: tens of seconds on a loaded CI
machine), so the default run tries ``QUICK_EXAMPLES`` schedules, not the plugin's 10.  Ask for
more as a user would: ``--unickpt-examples=N``, the ``unickpt_examples`` ini option or
``UNICKPT_EXAMPLES=N``.
"""

from __future__ import annotations

import os

import pytest

QUICK_EXAMPLES = 2


@pytest.fixture
def unickpt_examples(request: pytest.FixtureRequest, unickpt_examples: int) -> int:
    """The plugin's count when one was asked for, else ``QUICK_EXAMPLES``."""
    cfg = request.config
    asked = (cfg.getoption("--unickpt-examples", default=None) is not None
             or str(cfg.getini("unickpt_examples") or "").strip()
             or os.environ.get("UNICKPT_EXAMPLES", "").strip())
    return unickpt_examples if asked else min(unickpt_examples, QUICK_EXAMPLES)
