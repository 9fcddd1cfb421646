"""The package's floor plan, checked from the source: imports only go down the layers listed in
qat/__init__.py, there is no import cycle among qat modules, and no import is hidden inside a
function (where it would dodge both checks)."""
import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "qat"

# Bottom to top; a module may import modules of its own layer or of the layers below it.
LAYERS = [
    ["qat", "qat.errors", "qat.checks", "qat.io", "qat.runtime", "qat.memo"],
    ["qat.quant"],
    ["qat.data", "qat.metrics", "qat.tracking"],
    ["qat.layers", "qat.training"],
    ["qat.algorithms", "qat.export"],
    ["qat.recipes"],
    ["qat.experiment", "qat.aggregate", "qat.sweep_report"],
    ["qat.config"],
]
# Function-level imports of third-party modules are allowed only where importing is the point.
FUNCTION_IMPORTS_ALLOWED = {"qat.runtime"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS: add it"
    return best[0]


def targets(node) -> list:
    """The qat modules an import statement imports."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "qat"]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "qat" and node.level == 0:
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
        return subs or [node.module]
    return []


def imports(path: Path):
    """(qat modules imported at module level, (line, text) of imports inside functions)."""
    tree = ast.parse(path.read_text())
    top, nested = [], []
    for node in tree.body:
        top += targets(node)
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    nested.append((node.lineno, ast.unparse(node), bool(targets(node))))
    return top, nested


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_every_module_is_in_a_layer():
    for name in MODULES:
        layer_of(name)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down(module):
    up = [t for t in GRAPH[module][0] if layer_of(t) > layer_of(module)]
    assert not up, f"{module} (layer {layer_of(module)}) imports {up} from a higher layer"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_inside_functions(module):
    nested = GRAPH[module][1]
    assert not [n for n in nested if n[2]], f"{module} imports qat modules inside functions: {nested}"
    if module not in FUNCTION_IMPORTS_ALLOWED:
        assert not nested, f"{module} imports inside functions: {nested}"


def test_no_import_cycles():
    edges = {m: {t for t in GRAPH[m][0] if t in MODULES and t != m} for m in MODULES}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_checks_detect_a_violation(tmp_path):
    """The checks can fail: a function-level qat import is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from qat.config import run_spec\n    return run_spec\n")
    assert imports(bad)[1] and imports(bad)[1][0][2]
    assert layer_of("qat.config") > layer_of("qat.quant.spec")
