"""The package's structure, as DESIGN.md and the README's layout section state it: layers that import only
downward, no import circle, short modules, and imports inside functions only where they keep an optional
dependency optional (or, in the command-line entry points, keep a command from loading what it never runs).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "megaevo"

# Lowest first. A module may import modules of its own layer and of the layers below it, never above.
LAYERS = [
    ("base", ["megaevo.errors", "megaevo.log", "megaevo.configio", "megaevo.common", "megaevo.metrics",
              "megaevo.kernels", "megaevo._C"]),
    ("parallel", ["megaevo.parallel"]),
    ("model", ["megaevo.model"]),
    ("data", ["megaevo.data"]),
    ("config", ["megaevo.config"]),
    ("plan", ["megaevo.plan"]),
    ("checkpoint", ["megaevo.checkpoint"]),
    ("convert", ["megaevo.convert"]),
    ("inference", ["megaevo.inference"]),
    ("eval", ["megaevo.eval"]),
    ("training", ["megaevo.training"]),
    ("stages", ["megaevo.stages"]),
    ("suite", ["megaevo.suite"]),
    ("demo", ["megaevo.demo"]),
    ("commands", ["megaevo.cli", "megaevo.train", "megaevo"]),
]
MAX_LINES = 600
# Where a function-level import may also keep a command from loading what it never runs.
ENTRY_POINTS = {"megaevo.cli", "megaevo.train", "megaevo", "megaevo.plan.cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The megaevo module that an imported name lives in (None outside megaevo)."""
    if name == "megaevo.kernels" or name.startswith("megaevo.kernels."):
        return "megaevo.kernels"
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path):
    """(imported module, line, inside a function) for each megaevo import of module ``name``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    in_function, type_only = set(), set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n == "megaevo" or not n.startswith("megaevo."):
                continue
            target = _target(n)
            if target and target != name and target != "megaevo":
                yield target, node.lineno, id(node) in in_function


def _layer(module: str) -> int:
    best, where = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, where = len(p), i
    assert where is not None, f"{module} is in no layer: add it to LAYERS (and to the README's layout)"
    return where


def test_every_import_runs_downward():
    upward = set()
    for name, path in MODULES.items():
        for target, line, _ in _imports(name, path):
            if _layer(target) > _layer(name):
                upward.add(f"{path.relative_to(ROOT.parent)}:{line}: {name} ({LAYERS[_layer(name)][0]}) imports "
                              f"{target} ({LAYERS[_layer(target)][0]})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    graph = {name: {t for t, _, _ in _imports(name, path)} for name, path in MODULES.items()}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, "modules that import each other (directly or round a circle):\n" + \
        "\n".join(" <-> ".join(c) for c in circles)


def test_modules_are_short():
    long = {str(p.relative_to(ROOT.parent)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_function_level_imports_say_why():
    """An import of a megaevo module inside a function keeps an optional dependency optional, and a comment
    on its line or the line above says so (``optional``); the command entry points may also defer a
    command's own modules (``lazy``)."""
    unexplained = set()
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, line, inside in _imports(name, path):
            if not inside:
                continue
            said = " ".join(lines[max(line - 2, 0):line]).lower()
            if "optional" in said or (name in ENTRY_POINTS and "lazy" in said):
                continue
            unexplained.add(f"{path.relative_to(ROOT.parent)}:{line}: {target}")
    assert not unexplained, "function-level megaevo imports without a stated reason:\n" + "\n".join(sorted(unexplained))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_has_a_layer(module):
    _layer(module)
