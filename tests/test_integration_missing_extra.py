"""An integration whose framework is not installed says which extra to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import sys
sys.modules[{blocked!r}] = None  # as if the package were not installed
import unickpt
try:
    import unickpt.integrations.{name}
except unickpt.MissingDependencyError as e:
    print("missing:", e)
"""


@pytest.mark.parametrize("name,blocked,extra", [("lightning", "pytorch_lightning", "lightning"),
                                                ("accelerate", "torch", "accelerate")])
def test_a_missing_framework_is_a_typed_error_naming_the_extra(name, blocked, extra):
    p = subprocess.run([sys.executable, "-c", CHILD.format(name=name, blocked=blocked)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith(f"missing: unickpt.integrations.{name} needs "), p.stdout
    assert f"pip install unickpt[{extra}]" in p.stdout
