"""Tools to prove that a trainer resumes bit for bit: comparison, resume checks, strategies.

* :func:`assert_trees_equal` / :func:`diff_trees`: compare two states bit for bit (framework
  objects accepted through their adapters) with a report naming every differing leaf.
* :func:`assert_resume_deterministic`: run a user's training function uninterrupted and
  interrupted (in-process stops or real SIGKILLs of a subprocess) and compare final states;
  hypothesis picks the interruption schedules and shrinks a failure to the smallest one.
* ``unickpt.testing.strategies``: hypothesis strategies for state trees.
* ``unickpt.testing.conformance``: the checks every adapter must pass
  (:class:`~unickpt.testing.conformance.AdapterConformance`, to subclass in an adapter
  package's tests; see docs/adapters.md).
* ``unickpt.testing.crash`` and ``unickpt.testing.fuzz``: kill (or fill the disk) at every
  I/O call of a save, retention, archive or overwrite and check the restart; feed mutated
  checkpoints to every reader (see docs/testing.md).
* A pytest plugin (``unickpt_root`` fixture, ``--unickpt-examples``), registered through the
  ``pytest11`` entry point.

The resume checks and the strategies need hypothesis (``pip install unickpt[test]``);
comparing trees needs only numpy.

>>> import numpy as np
>>> from unickpt.testing import assert_trees_equal
>>> assert_trees_equal({"w": np.arange(3.0)}, {"w": np.arange(3.0)})
"""

from __future__ import annotations

from typing import Any

from .compare import TreeDifference, TreesDifferError, assert_trees_equal, diff_trees

__all__ = [
    "assert_trees_equal",
    "diff_trees",
    "TreeDifference",
    "TreesDifferError",
    "assert_resume_deterministic",
    "ResumeMismatchError",
    "set_default_max_examples",
    "default_max_examples",
    "multiprocess_train",
    "JobFailedError",
]

_LAZY = {"assert_resume_deterministic": "resume", "ResumeMismatchError": "resume",
         "set_default_max_examples": "resume", "default_max_examples": "resume",
         "multiprocess_train": "multiprocess", "JobFailedError": "multiprocess"}


def require_hypothesis() -> Any:
    """Import hypothesis, or raise an ImportError saying how to install it."""
    try:
        import hypothesis
    except ImportError as e:
        raise ImportError(
            "unickpt.testing needs hypothesis for resume checks and strategies; install it "
            "with `pip install unickpt[test]` (or `pip install hypothesis`)") from e
    return hypothesis


def __getattr__(name: str) -> Any:
    # The resume checker and the strategies import hypothesis: load them on first use so that
    # assert_trees_equal works without it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name == "strategies":
        require_hypothesis()
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
