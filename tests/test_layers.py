"""The package's shape (the issue "One house"): layers as subpackages that import only downward, no
import cycle between modules (function-level imports included), no function over 80 lines, no file over
450. The checker is tested on a planted cycle and a planted upward import, so it can fail."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# lowest first: a layer may import the ones before it, never one after it
LAYERS = ("errors", "io", "core", "nets", "objectives", "models", "training", "sampling", "editing", "methods",
          "eval", "serve", "bench", "cli")


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """module → the package's modules it imports anywhere in its body (``import``/``from`` at any depth)."""
    files = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (src / package).rglob("*.py")}

    def resolve(name: str, here: str, level: int) -> str | None:
        if level:
            base = here.split(".") if files[here].name == "__init__.py" else here.split(".")[:-1]
            name = ".".join(base[: len(base) - level + 1] + ([name] if name else []))
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [(a.name, 0) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                prefix = node.module + "." if node.module else ""
                names = [(node.module or "", node.level)] + [(prefix + a.name, node.level) for a in node.names]
            else:
                continue
            for name, level in names:
                if level or name.startswith(package + ".") or name == package:
                    target = resolve(name, module, level)
                    if target and target not in (module, package):   # the package face only hands names on
                        targets.add(target)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

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


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[tuple[str, str]]:
    """(module, imported module) pairs where a layer imports one above it."""
    rank = {name: i for i, name in enumerate(layers)}
    return sorted((m, t) for m, ts in graph.items() for t in ts
                  if layer_of(m) in rank and layer_of(t) in rank and rank[layer_of(t)] > rank[layer_of(m)])


def test_no_import_cycle_and_layers_import_only_downward():
    graph = import_graph(SRC, "fewstep")
    assert not cycles(graph), cycles(graph)
    layers = {m: layer_of(m) for m in graph}
    layer_graph = {}
    for m, ts in graph.items():
        layer_graph.setdefault(layers[m], set()).update(layers[t] for t in ts if layers[t] != layers[m])
    assert not cycles(layer_graph), cycles(layer_graph)
    assert not upward_imports(graph), upward_imports(graph)
    unknown = {layer_of(m) for m in graph if "." in m} - set(LAYERS) - {"__main__"}
    assert not unknown, f"subpackages outside the layer order: {unknown}"


def test_no_function_over_80_lines_and_no_file_over_450():
    long_functions, big_files = [], []
    for path in (SRC / "fewstep").rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 450:
            big_files.append(path.name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{path.relative_to(SRC)}:{node.name}")
    assert not long_functions and not big_files, (long_functions, big_files)


def test_the_checker_finds_a_planted_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "pkg"
    for sub in ("core", "models"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from ..models.b import g  # function-level: still an edge\n")
    (pkg / "models" / "b.py").write_text("from ..core.a import f\n")
    graph = import_graph(tmp_path, "pkg")
    assert cycles(graph) == [["pkg.core.a", "pkg.models.b"]]
    assert upward_imports(graph, ("core", "models")) == [("pkg.core.a", "pkg.models.b")]
    (pkg / "core" / "a.py").write_text("x = 1\n")
    graph = import_graph(tmp_path, "pkg")
    assert not cycles(graph) and not upward_imports(graph, ("core", "models"))
