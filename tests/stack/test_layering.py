"""The project's layers, read from every module's imports (module level and inside functions alike):
rigl_core imports none of the service; api and worker never import each other; no two project modules
import each other, directly or round a longer loop."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rigl_core", "api", "worker", "store", "service_common")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imported(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (`from a.b import c` counts a.b.c when that is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules and target != name}
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(path, name, modules) for name, path in modules.items()}


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_scan_sees_the_imports_it_judges():
    edges = graph()
    assert "store.jobs" in edges["api.app"] and "rigl_core.spec" in edges["worker.runner"]
    assert "rigl_core.export.pipeline" in edges["rigl_core.training.run"]


def test_rigl_core_imports_none_of_the_service():
    bad = [(a, b) for a, targets in graph().items() if top(a) == "rigl_core"
           for b in targets if top(b) in ("api", "worker", "store", "service_common")]
    assert bad == []


def test_api_and_worker_never_import_each_other():
    bad = [(a, b) for a, targets in graph().items() for b in targets if {top(a), top(b)} == {"api", "worker"}]
    assert bad == []


def test_the_shared_service_modules_import_neither_api_nor_worker():
    bad = [(a, b) for a, targets in graph().items() if top(a) in ("store", "service_common")
           for b in targets if top(b) in ("api", "worker")]
    assert bad == []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a set of modules in a loop.
    A package's __init__ importing its own submodules is not a loop of two concepts: left out."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target.startswith(node + "."):  # a package importing its own submodule
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_among_project_modules():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_loop_of_two_and_of_three():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


TRACING_MODULES = {"service_common.tracing", "rigl_core.integrations.tracing"}  # one a side


def external_imports(path: Path) -> set[str]:
    """The top-level names of what `path` imports absolutely (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_tracing_modules_import_opentelemetry():
    """Tracing is an extra: every other module works without it (service_common/tracing.py and
    rigl_core/integrations/tracing.py are the only doors; the latter takes the module an SDK already loaded)."""
    importers = {name for name, path in project_modules().items() if "opentelemetry" in external_imports(path)}
    assert "service_common.tracing" in importers and importers <= TRACING_MODULES


def test_only_the_ray_module_imports_ray():
    """Ray is an optional extra (`rigl-service[ray]`): only worker/ray_gang.py, loaded for jobs on several
    nodes, may import it; everything else runs without it."""
    users = sorted(name for name, path in project_modules().items() if "ray" in external_imports(path))
    assert users == ["worker.ray_gang"]
