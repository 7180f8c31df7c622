"""Suite-wide rules.

In CI (``CI`` set to true/1/yes), where every framework and adapter is installed, a failed
import must fail the run rather than turn into a skip: ``pytest.importorskip`` becomes a plain
import there, and any skip whose reason is not about missing hardware (CUDA / GPU) is reported
as a failure.  Locally, missing optional frameworks still skip.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
HARDWARE_SKIP = re.compile(r"cuda|gpu|no writeback hint", re.IGNORECASE)


def _strict_importorskip(modname: str, minversion: str | None = None,
                         reason: str | None = None, **_: Any) -> Any:
    try:
        return importlib.import_module(modname)
    except ImportError as e:
        raise ImportError(f"{modname} must import in CI (CI={os.environ.get('CI')!r}); "
                          f"a broken install is a failure, not a skip: {e}") from e


if IN_CI:
    pytest.importorskip = _strict_importorskip


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    rep = outcome.get_result()
    if IN_CI and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        if not HARDWARE_SKIP.search(reason):
            rep.outcome = "failed"
            rep.longrepr = f"skipped in CI, where everything is installed: {reason}"


from _seaweed import s3_root, seaweed  # noqa: E402,F401  (the S3 server fixtures)
