"""The import structure: no cycles among epban's modules, and kernels/ importing nothing of epban.

Each module's source is parsed (not run) and every import statement in it counts, those
inside functions too (a lazy import still makes the two modules depend on each other); only
imports under ``if TYPE_CHECKING:`` are left out. ``import a.b.c`` and ``from a.b import c``
depend on the module ``a.b.c`` where it is one, else on ``a.b``; a package's ``__init__``
running first is not counted as a dependency of its submodules.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import epban

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = "epban._C"  # compiled: no source to parse, and it imports nothing of epban


def _walk_error(name):
    raise ImportError(f"cannot import package {name} to list its modules")


def epban_modules() -> dict[str, Path]:
    """Module name -> source file of every module of the ``epban`` package (the compiled
    ``epban._C`` has no source and is left out)."""
    modules = {"epban": Path(epban.__file__)}

    def walk(path, prefix):
        for info in pkgutil.walk_packages(path, prefix, onerror=_walk_error):
            if info.name == EXTENSION or info.name.startswith(EXTENSION + "."):
                continue
            spec = info.module_finder.find_spec(info.name)
            if spec is not None and spec.origin is not None and spec.origin.endswith(".py"):
                modules[info.name] = Path(spec.origin)

    walk(epban.__path__, "epban.")
    if "epban.kernels" not in modules:  # installed from kernels/ (setup.py's package_dir), outside epban/
        kernels = importlib.import_module("epban.kernels")
        modules["epban.kernels"] = Path(kernels.__file__)
        walk(kernels.__path__, "epban.kernels.")
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node of ``tree``, at any depth, but not under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_names(name: str, path: Path) -> set[str]:
    """The absolute names of the modules (or their attributes) that module ``name`` imports."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            parent = ".".join(parts[: len(parts) - (node.level - 1)])
            base = f"{parent}.{base}" if base else parent
        # each name is a submodule, or an attribute of the module ``base`` (resolved below)
        found.update(base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(modules: dict[str, Path], leaves=(EXTENSION,)) -> dict[str, set[str]]:
    """Module -> the epban modules its import statements run. ``leaves``: modules without
    source (they import nothing of epban)."""
    graph = {}
    known = set(modules) | set(leaves)
    for name, path in modules.items():
        targets = set()
        for imported in imported_names(name, path):
            # the longest prefix that is a module: "epban.ops.ssim.ssim" -> "epban.ops.ssim"
            while imported and imported not in known:
                imported = imported.rpartition(".")[0]
            if imported and imported in modules:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component that has one (Tarjan)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph, component: set[str]) -> list[str]:
    """A shortest cycle through the first module (by name) of a strongly connected component."""
    start = min(component)
    paths, seen = {start: [start]}, {start}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    return paths[v] + [start]
                if w not in seen:
                    seen.add(w)
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component without a cycle")


def test_the_walk_finds_the_packages_modules():
    modules = epban_modules()
    for name in ("epban", "epban.ops.ssim", "epban.models.pban", "epban.kernels", "epban.settings"):
        assert name in modules, name
    assert EXTENSION not in modules


def test_the_graph_resolves_relative_lazy_and_package_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.sub import a\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from . import b\nfrom ..c import thing\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    import pkg.sub.a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg\nimport os\n")
    modules = {"pkg": pkg / "__init__.py", "pkg.sub": pkg / "sub" / "__init__.py", "pkg.sub.a": pkg / "sub" / "a.py",
               "pkg.sub.b": pkg / "sub" / "b.py", "pkg.c": pkg / "c.py"}
    graph = import_graph(modules)
    assert graph["pkg"] == {"pkg.sub.a"}
    assert graph["pkg.sub.a"] == {"pkg.sub.b", "pkg.c"}
    assert graph["pkg.sub.b"] == {"pkg.sub.a"}  # inside a function: counted
    assert graph["pkg.c"] == set()  # under TYPE_CHECKING: not counted
    assert find_cycles(graph) == [["pkg.sub.a", "pkg.sub.b", "pkg.sub.a"]]


def test_no_import_cycles_among_epban_modules():
    cycles = find_cycles(import_graph(epban_modules()))
    assert not cycles, "import cycles among epban modules:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_kernels_import_nothing_of_epban_but_other_kernels():
    """kernels/ holds Triton kernels and jit helpers only: no epban.ops (which imports the
    kernels), nor any other epban module; sibling kernel modules are fine."""
    files = sorted((ROOT / "kernels").glob("**/*.py"))
    assert files
    offending = []
    for path in files:
        rel = path.relative_to(ROOT / "kernels").with_suffix("")
        parts = ["epban", "kernels", *rel.parts]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for imported in imported_names(name, path):
            if (imported == "epban" or imported.startswith("epban.")) and not (
                    imported == "epban.kernels" or imported.startswith("epban.kernels.")):
                offending.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not offending, "\n".join(offending)
