"""pytest plugin (entry point ``pytest11``): fixtures and options for resume-determinism tests.

Installed with unickpt; nothing to configure.  It provides:

* ``unickpt_root``: a fresh, empty run-root directory (under ``tmp_path``);
* ``unickpt_examples``: how many interruption schedules a hypothesis-driven check tries;
* ``unickpt_resume_check``: :func:`unickpt.testing.assert_resume_deterministic` with its run
  roots under ``tmp_path`` and that example count, so a user's test is one line::

      def test_my_trainer_resumes_bit_for_bit(unickpt_resume_check):
          unickpt_resume_check(my_project.train, total_steps=20)

* ``--unickpt-examples=N`` on the command line (or ``unickpt_examples = N`` in the ini file;
  or the ``UNICKPT_EXAMPLES`` environment variable): schedules per check, default 10.  Use a
  small number while developing and a large one in a nightly job.

Importing this plugin needs only pytest; hypothesis is imported by the checks themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("unickpt", "unickpt resume-determinism checks")
    group.addoption("--unickpt-examples", type=int, default=None, metavar="N",
                    help="interruption schedules each hypothesis-driven resume check tries "
                         "(default: ini unickpt_examples, $UNICKPT_EXAMPLES, else 10)")
    parser.addini("unickpt_examples", "interruption schedules per resume check", default="")


def _examples(config: pytest.Config) -> int | None:
    n = config.getoption("--unickpt-examples", default=None)
    if n is None:
        raw = str(config.getini("unickpt_examples") or "").strip()
        if raw:
            try:
                n = int(raw)
            except ValueError:
                raise pytest.UsageError(f"unickpt_examples = {raw!r}: expected an integer") \
                    from None
    if n is not None and n < 1:
        raise pytest.UsageError(f"--unickpt-examples={n}: expected a positive number")
    return n


def pytest_configure(config: pytest.Config) -> None:
    from .resume import set_default_max_examples

    set_default_max_examples(_examples(config))


def pytest_unconfigure(config: pytest.Config) -> None:
    from .resume import set_default_max_examples

    set_default_max_examples(None)


def pytest_report_header(config: pytest.Config) -> str | None:
    n = _examples(config)
    return None if n is None else f"unickpt: {n} interruption schedules per resume check"


@pytest.fixture
def unickpt_root(tmp_path: Any) -> Any:
    """A fresh, empty run root directory (a ``pathlib.Path``) for a checkpointing test."""
    root = tmp_path / "run"
    root.mkdir()
    return root


@pytest.fixture
def unickpt_examples() -> int:
    """Interruption schedules a hypothesis-driven resume check tries in this session."""
    from .resume import default_max_examples

    return default_max_examples()


@pytest.fixture
def unickpt_resume_check(tmp_path: Any, unickpt_examples: int) -> Callable[..., Any]:
    """:func:`~unickpt.testing.assert_resume_deterministic`, run roots under ``tmp_path``.

    Keyword arguments given to the fixture's callable override the defaults.
    """
    from .resume import assert_resume_deterministic

    base = tmp_path / "unickpt-resume"
    base.mkdir()
    return functools.partial(assert_resume_deterministic, root=base,
                             max_examples=unickpt_examples)
