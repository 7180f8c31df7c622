"""The adapter contract module: dependency-free, no import cycles, no private-name imports."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import unickpt
from unickpt import contract

ROOT = pathlib.Path(unickpt.__file__).parent
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def _imports(path: pathlib.Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, level) of every import statement in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", [a.name for a in node.names], node.level))
    return out


def test_contract_imports_only_the_standard_library():
    for module, _, level in _imports(ROOT / "contract.py"):
        assert level == 0 and module.split(".")[0] in STDLIB, module


def _local_deps(name: str) -> set[str]:
    deps = set()
    for module, _names, level in _imports(ROOT / f"{name}.py"):
        if level == 1 and module:
            deps.add(module.split(".")[0])
    return deps


def test_adapters_state_and_contract_have_no_import_cycle():
    assert "state" not in _local_deps("adapters")
    assert "adapters" in _local_deps("state")
    assert _local_deps("contract") == set()


OWNED = ["adapters.py", "state.py", "rng.py", "tree.py", "contract.py", "testing/compare.py",
         "testing/resume.py", "testing/strategies.py", "testing/pytest_plugin.py",
         "testing/__init__.py", "testing/conformance.py", "migration/__init__.py",
         "migration/_convert.py", "migration/_trees.py", "migration/api.py",
         "migration/optim.py", "migration/rules.py", "migration/schedule.py",
         "migration/optax_spec.py", "migration/errors.py"]


@pytest.mark.parametrize("rel", OWNED)
def test_no_module_imports_another_modules_private_name(rel):
    private = [(m, n) for m, names, _ in _imports(ROOT / rel) for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_contract_protocols_match_the_concrete_contexts():
    from unickpt.state import RestoreContext, SaveContext

    assert isinstance(SaveContext({}), contract.SaveContext)
    assert isinstance(RestoreContext(), contract.RestoreContext)
    assert RestoreContext(select=[("a",)]).selected(("b",)) == "none"
    assert RestoreContext(select=[("a", "x")]).selected(("a",)) == "some"


def test_plugin_and_adapter_are_the_contract_objects():
    from unickpt import adapters

    assert adapters.Plugin is contract.Plugin and adapters.Adapter is contract.Adapter
    assert all(isinstance(p, contract.Plugin) for p in adapters.plugins())


def test_migration_is_imported_lazily():
    code = ("import sys, unickpt\n"
            "assert 'unickpt.migration' not in sys.modules\n"
            "assert 'migrate' in unickpt.__all__ and 'migrate' in dir(unickpt)\n"
            "from unickpt import migrate, MigrationReport\n"
            "import unickpt.migration as m\n"
            "assert migrate is m.migrate and unickpt.Rule is m.Rule\n"
            "try:\n    unickpt.nope\nexcept AttributeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert "has no attribute 'nope'" in out.stdout
