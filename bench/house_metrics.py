"""The shape of the code base: files and lines per package, the longest functions and classes, and import
cycles among the project's modules (module-level and lazy imports alike).

    python bench/house_metrics.py            # prints JSON
    python bench/house_metrics.py --md       # a markdown summary
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rigl_core", "api", "store", "worker", "service_common", "bench", "tests")
CODE = ("rigl_core", "api", "store", "worker", "service_common")  # where units and cycles are counted


def measure(root: Path = ROOT) -> dict:
    out: dict = {"packages": {}, "cycles": []}
    units: list[tuple[int, str, str]] = []
    imports: dict[str, set[str]] = {}
    for package in PACKAGES:
        files = lines = 0
        for folder, _, names in os.walk(root / package):
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = Path(folder) / name
                rel = path.relative_to(root).as_posix()
                source = path.read_text()
                files, lines = files + 1, lines + source.count("\n")
                tree = ast.parse(source)
                module = rel[:-3].replace("/", ".").removesuffix(".__init__")
                found = set()
                for node in ast.walk(tree):
                    if package in CODE and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        kind = "class" if isinstance(node, ast.ClassDef) else "function"
                        units.append((node.end_lineno - node.lineno + 1, kind, f"{rel}:{node.lineno} {node.name}"))
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                        found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
                    elif isinstance(node, ast.Import):
                        found |= {a.name for a in node.names}
                if package in CODE and "migrations.versions" not in module:
                    imports[module] = found
        out["packages"][package] = {"files": files, "lines": lines}
    graph = {m: {i for i in found if i in imports and i != m} for m, found in imports.items()}
    out["cycles"] = _cycles(graph)
    units.sort(reverse=True)
    out["longest_functions"] = [[n, where] for n, kind, where in units if kind == "function"][:5]
    out["longest_classes"] = [[n, where] for n, kind, where in units if kind == "class"][:5]
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def markdown(m: dict) -> str:
    lines = ["| package | files | lines |", "|---|---|---|"]
    lines += [f"| {p} | {v['files']} | {v['lines']:,} |" for p, v in m["packages"].items()]
    lines += ["", "Longest functions: " + "; ".join(f"{w} ({n})" for n, w in m["longest_functions"]),
              "", "Longest classes: " + "; ".join(f"{w} ({n})" for n, w in m["longest_classes"]),
              "", "Import cycles: " + ("; ".join(" ↔ ".join(c) for c in m["cycles"]) or "none")]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--md", action="store_true")
    args = parser.parse_args()
    result = measure()
    print(markdown(result) if args.md else json.dumps(result, indent=1))
