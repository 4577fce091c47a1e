"""No hidden wiring: the first-party modules import each other without a cycle.

The graph comes from the source (`ast`), not from importing it, so a cycle that only bites in
some import order is found too. Every import counts, also one inside a function or under
`if TYPE_CHECKING:`: a lazy import hides a cycle from the interpreter, not from the design, and
the issue asks for none between modules. Relative imports are resolved, and `from pkg import
name` is an import of the module `pkg.name` when that is a module, else of `pkg` itself.
Importing a module also runs its packages' `__init__`; those edges are left out, because every
`__init__` here is empty and counting them would only tie each module to its siblings.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ingest", "adapters", "store_rules", "dashboard", "seeds", "storepulse")


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    where: str  # path:line of the import statement


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Module name → file, for every .py file of the packages."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(module: str, path: Path, modules: dict[str, Path], root: Path) -> list[Edge]:
    """The first-party modules `module` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(path.read_text("utf-8"), filename=str(path))
    edges = []

    def add(target: str, node: ast.stmt) -> None:
        if target in modules and target != module:
            edges.append(Edge(module, target, f"{path.relative_to(root)}:{node.lineno}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".") if package else []
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}" if base else alias.name
                add(submodule if submodule in modules else base, node)
    return edges


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, list[Edge]]:
    modules = module_files(root, packages)
    return {name: imports_of(name, path, modules, root) for name, path in modules.items()}


def cycles(graph: dict[str, list[Edge]]) -> list[tuple[set[str], list[Edge]]]:
    """Each strongly connected component of more than one module (Tarjan), with one cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    counter = 0

    def connect(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for edge in graph.get(node, []):
            if edge.imported not in index:
                connect(edge.imported)
                low[node] = min(low[node], low[edge.imported])
            elif edge.imported in on_stack:
                low[node] = min(low[node], index[edge.imported])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [(component, _cycle_in(graph, component)) for component in components]


def _cycle_in(graph: dict[str, list[Edge]], component: set[str]) -> list[Edge]:
    """A shortest cycle through the component's first module (breadth-first, inside the component)."""
    start = min(component)
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph[node]:
                if edge.imported not in component or edge.imported in came_by:
                    continue
                came_by[edge.imported] = edge
                if edge.imported == start:
                    path = [edge]
                    while path[0].importer != start:
                        path.insert(0, came_by[path[0].importer])
                    return path
                following.append(edge.imported)
        frontier = following
    raise AssertionError(f"no cycle found in {sorted(component)}")


def describe(component: set[str], cycle: list[Edge]) -> str:
    """The shortest cycle through the component's first module, and every module tangled with it."""
    chain = " → ".join([cycle[0].importer, *(e.imported for e in cycle)])
    lines = [chain, *(f"    {e.importer} imports {e.imported} at {e.where}" for e in cycle)]
    if len(component) > len(cycle):
        lines.append(f"    (one knot of {len(component)} modules: {', '.join(sorted(component))})")
    return "\n".join(lines)


def test_first_party_modules_import_each_other_without_a_cycle() -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 60 and sum(len(edges) for edges in graph.values()) > 150  # the walk saw the code
    found = cycles(graph)
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(describe(*c) for c in found)


def test_the_walk_finds_cycles_through_lazy_relative_and_from_package_imports(tmp_path: Path) -> None:
    package = tmp_path / "shop"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "sub/__init__.py": "",
        # a relative import of a sibling module
        "sub/a.py": "from . import b\n",
        # a lazy import inside a function, of the package-qualified module
        "sub/b.py": "def later():\n    from shop.sub.a import something\n",
        # `from pkg import module` and a parent-relative import: c → d → c
        "c.py": "from shop import d\n",
        "d.py": "from .c import thing\nimport json\n",
        # no cycle: e imports c only
        "e.py": "import shop.c\n",
    }
    for name, text in files.items():
        (package / name).write_text(text, "utf-8")
    graph = import_graph(tmp_path, ["shop"])
    assert [e.imported for e in graph["shop.sub.a"]] == ["shop.sub.b"]
    assert [e.imported for e in graph["shop.sub.b"]] == ["shop.sub.a"]
    assert [e.imported for e in graph["shop.e"]] == ["shop.c"]
    found = sorted(describe(*c).splitlines()[0] for c in cycles(graph))
    assert found == ["shop.c → shop.d → shop.c", "shop.sub.a → shop.sub.b → shop.sub.a"]
