"""The package's import structure, read from the source with ``ast`` (nothing is imported).

- No import cycle among dmquant modules, counting imports made at module level AND inside functions
  (a function-level import is a dependency all the same; it only hides the cycle until call time).
  Importing ``a.b.c`` also runs the ``__init__`` of ``a.b``: those edges count too.
- Inside a function, a module in ``CHECKED_FOR_LOCAL_IMPORTS`` imports only the optional or slow-to-import
  dependencies of ``ALLOWED_LOCAL_IMPORTS``; everything else is imported at the top of the module.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import dmquant

PACKAGE = Path(dmquant.__file__).parent

# Imported inside functions so that importing dmquant does not pay for them (or need them):
# triton is optional (GPU kernels); open_clip, torchmetrics and accelerate take seconds to import and
# only the metrics / distributed paths use them; clean-fid only FID.
ALLOWED_LOCAL_IMPORTS = {"triton", "open_clip", "torchmetrics", "accelerate", "cleanfid",
                         # dmquant's Triton kernels import triton at their top (loaded on first use)
                         "dmquant.kernels._attention_triton", "dmquant.kernels._gemm_triton",
                         "dmquant.kernels._w4a16_triton", "dmquant.kernels._tiles_triton",
                         # dmquant's diffusers quantizer is imported while diffusers loads its quantizers, before
                         # diffusers' models can be imported: it reaches the loading code on first use
                         "dmquant.diffusers_native"}

# Files (or folders, ending in "/") held to the rule above: the whole package.
CHECKED_FOR_LOCAL_IMPORTS = [
    "dmquant/",
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("dmquant", *path.relative_to(PACKAGE).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported name, line, inside a function) for every import statement that runs."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.rsplit(".", child.level - 1)[0] if child.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                for alias in child.names:  # `from pkg import submodule` imports the submodule
                    name = f"{base}.{alias.name}"
                    found.append((name if name in MODULES else base, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_graph() -> dict[str, set[str]]:
    """module -> the dmquant modules whose code runs when it imports (its targets and their packages)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        own = set(_ancestors(module))
        for name, _, _ in _imports(module):
            if name.split(".")[0] != "dmquant":
                continue
            target = next((m for m in reversed(_ancestors(name)) if m in MODULES), None)
            if target is None:
                continue
            graph[module] |= {m for m in _ancestors(target) if m in MODULES and m not in own}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, c) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to start
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component without a cycle")


def test_the_walker_sees_cycles_and_packages():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert sorted(map(tuple, find_cycles(graph))) == [("a", "b", "c", "a"), ("d", "d")]
    assert "dmquant.metrics.images" in MODULES and "dmquant.zoo" in MODULES
    assert "dmquant.zoo" in import_graph()["dmquant.metrics.evaluation"]  # the package of zoo.data runs too


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _checked(path: Path) -> bool:
    rel = path.relative_to(PACKAGE.parent).as_posix()
    return any(rel == entry or (entry.endswith("/") and rel.startswith(entry)) for entry in CHECKED_FOR_LOCAL_IMPORTS)


def test_imports_inside_functions_are_only_optional_heavy_dependencies():
    bad = sorted({
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line}: {name}"
        for m in MODULES if _checked(MODULES[m])
        for name, line, in_function in _imports(m)
        if in_function and name.split(".")[0] not in ALLOWED_LOCAL_IMPORTS and name not in ALLOWED_LOCAL_IMPORTS
    })
    assert not bad, "import these at the top of the module:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", ["dmquant", "dmquant.metrics"])
def test_every_advertised_name_imports(package):
    module = importlib.import_module(package)
    missing = []
    for name in module.__all__:
        try:
            getattr(module, name)
        except AttributeError as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, f"{package}.__all__ names that do not import:\n" + "\n".join(missing)


def test_the_metrics_docstring_names_are_advertised():
    import dmquant.metrics

    line = next(line for line in dmquant.metrics.__doc__.splitlines() if "from dmquant.metrics import" in line)
    names = [n.strip() for n in line.split("import", 1)[1].split(",")]
    assert set(names) <= set(dmquant.metrics.__all__)
