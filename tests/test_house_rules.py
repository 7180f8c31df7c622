"""The house rules of the core package, checked on its source (docs/adapters.md, ARCHITECTURE).

- no import cycle between modules of ``unickpt`` (module-level imports, ``TYPE_CHECKING``
  blocks included: a cycle of types is a cycle of design; imports inside functions are lazy
  by design and do not count);
- no module imports another module's underscore name (``from .x import _y``), and a private
  module (``_hash``) is imported only from inside its own package;
- no function or method whose code (docstring aside) is longer than ``MAX_FUNCTION_LINES``.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "unickpt"
MAX_FUNCTION_LINES = 80


def _modules(root: pathlib.Path = ROOT) -> dict[str, pathlib.Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out



def _package_of(mod: str, path: pathlib.Path) -> str:
    return mod if path.name == "__init__.py" else mod.rpartition(".")[0]


def _resolve(mod: str, path: pathlib.Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(mod, path).split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _module_level_imports(tree: ast.Module):
    """Import statements at module level (``TYPE_CHECKING`` blocks included, defs not)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody)
            for h in node.handlers:
                stack.extend(h.body)
        elif isinstance(node, ast.With):
            stack.extend(node.body)


def _all_imports(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def _targets(mod: str, path: pathlib.Path, node, modules) -> list[str]:
    """The unickpt modules an import statement loads."""
    found = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name.split(".")[0] == "unickpt":
                found.append(a.name)
        return [t for t in found if t in modules]
    base = _resolve(mod, path, node)
    if base.split(".")[0] != "unickpt":
        return []
    for a in node.names:
        sub = f"{base}.{a.name}"
        found.append(sub if sub in modules else base)
    return [t for t in found if t in modules]


def _graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = set()
        for node in _module_level_imports(tree):
            deps.update(_targets(mod, path, node, modules))
        # importing a.b.c runs a/__init__ and a/b/__init__ first, except the packages that
        # contain the importer (already initialising when it runs: not a cycle)
        own = _package_of(mod, path)
        expanded = set()
        for d in deps:
            parts = d.split(".")
            expanded.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts) + 1))
                            if p == d or not (own == p or own.startswith(p + ".")))
        g[mod] = {d for d in expanded if d in modules and d != mod}
    return g


def _cycles(modules: dict[str, pathlib.Path]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    g = _graph(modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle() -> None:
    cycles = _cycles(_modules())
    assert not cycles, "import cycles in unickpt (module-level imports):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def _private_violations(modules: dict[str, pathlib.Path]) -> list[str]:
    bad = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        own_pkg = _package_of(mod, path)
        for node in _all_imports(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(mod, path, node)
                if base.split(".")[0] != "unickpt":
                    continue
                names = [a.name for a in node.names]
            else:
                names = []
                base = ""
                for a in node.names:
                    if a.name.split(".")[0] == "unickpt":
                        base = a.name
            # a private module on the path must belong to the importer's own package
            parts = base.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])
                    if not own_pkg.startswith(owner) or own_pkg.count(".") != owner.count("."):
                        bad.append(f"{mod}: imports private module {'.'.join(parts[:i + 1])}")
            for n in names:
                if not (n.startswith("_") and not n.startswith("__")):
                    continue
                sub = f"{base}.{n}"
                if sub in modules:  # a private submodule: only from its own package
                    if base != own_pkg:
                        bad.append(f"{mod}: imports private module {sub}")
                else:
                    bad.append(f"{mod}: imports the private name {n} from {base}")
    return bad


def test_no_private_imports_across_modules() -> None:
    bad = _private_violations(_modules())
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def _long_functions(modules: dict[str, pathlib.Path]) -> list[str]:
    out = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if (len(body) > 1 and isinstance(body[0], ast.Expr)
                        and isinstance(body[0].value, ast.Constant)
                        and isinstance(body[0].value.value, str)):
                    body = body[1:]  # a docstring (with its examples) is not code
                n = node.end_lineno - body[0].lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{mod}.{node.name} ({path.name}:{node.lineno}): {n} lines")
    return out


def test_no_long_functions() -> None:
    long = _long_functions(_modules())
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("rule", [_cycles, _private_violations, _long_functions])
def test_rules_can_fail(rule, tmp_path) -> None:
    """Each check finds a planted violation (a check that cannot fail proves nothing)."""
    pkg = tmp_path / "unickpt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import _hidden\n")
    (pkg / "b.py").write_text("from .a import x\n_hidden = 1\n")
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    (pkg / "c.py").write_text(f"def long():\n{body}\n")
    assert rule(_modules(pkg))
