"""Imports point one way: each package may import only packages of a lower layer (or itself),
and no two modules import each other in a cycle. Read from the source (AST), so the test sees
imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lowest first. A module belongs to the longest prefix that names it.
LAYERS: list[tuple[str, ...]] = [
    ("privinf.ledger",),
    ("models", "he_kernels"),
    ("protocols.net", "protocols.protocol_config"),
    ("protocols.session_spec",),
    ("protocols.mpc", "protocols.he", "protocols.ee"),
    ("protocols.kv",),
    ("protocols.routes",),
    ("mpc_parties",),
    ("privinf",),
]
PACKAGES = ("privinf", "protocols", "models", "mpc_parties", "he_kernels")


def _unit(module: str) -> tuple[str, int]:
    """(the layer prefix that owns ``module``, its rank)."""
    best: tuple[str, int] | None = None
    for rank, names in enumerate(LAYERS):
        for prefix in names:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[0]):
                    best = (prefix, rank)
    if best is None and module in PACKAGES:
        return (module, -1)  # a bare top-level package: its __init__ imports nothing of ours
    if best is None:
        raise AssertionError(f"{module} is in no layer; add it to LAYERS")
    return best


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_only(tree: ast.Module) -> set[int]:
    """Ids of the import nodes under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            ids.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    return ids


def _imports(path: Path, module: str, runtime_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = _type_only(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def import_graph(root: Path = ROOT, runtime_only: bool = False) -> dict[str, set[str]]:
    """{module: modules of ours it imports} for every source module (generated code aside);
    ``runtime_only`` leaves out imports made for type annotations only (``if TYPE_CHECKING:``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "_generated" in path.parts:
                continue
            modules[_module_name(path, root)] = path
    graph = {}
    for name, path in modules.items():
        graph[name] = {target for target in _imports(path, name, runtime_only)
                       if target in modules and target != name}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports that point to a higher layer, or sideways to another unit of the same layer."""
    bad = []
    for source, targets in graph.items():
        unit, rank = _unit(source)
        for target in sorted(targets):
            target_unit, target_rank = _unit(target)
            if target_rank > rank or (target_rank == rank and target_unit != unit):
                bad.append(f"{source} -> {target}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between modules (each reported once, by Tarjan's strongly connected parts)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                part.append(top)
                if top == node:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _ignore_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exporting its own modules is not a cycle of the design."""
    return {src: {t for t in targets if not src.startswith(t + ".")} for src, targets in graph.items()}


def test_bare_package_inits_import_nothing_of_ours() -> None:
    graph = import_graph()
    assert {name: graph[name] for name in PACKAGES if _unit(name)[1] < 0 and graph[name]} == {}


def test_imports_point_down() -> None:
    assert upward_imports(import_graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(_ignore_package_inits(import_graph(runtime_only=True))) == []


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "privinf" / "ledger").mkdir()
    (tmp_path / "privinf" / "ledger" / "__init__.py").write_text("")
    (tmp_path / "privinf" / "ledger" / "counting.py").write_text("import protocols.net.channels\n")
    (tmp_path / "protocols" / "net").mkdir()
    (tmp_path / "protocols" / "net" / "__init__.py").write_text("")
    (tmp_path / "protocols" / "net" / "channels.py").write_text("from privinf.ledger import counting\n")
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == ["privinf.ledger.counting -> protocols.net.channels"]
    assert cycles(graph) == [["privinf.ledger.counting", "protocols.net.channels"]]


@pytest.mark.parametrize("module", ["models.ops", "protocols.mpc.dealer", "privinf.cli"])
def test_every_module_has_a_layer(module: str) -> None:
    assert _unit(module)[1] >= 0
