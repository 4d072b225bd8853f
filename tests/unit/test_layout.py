"""The tree is the map: no import circle, no module over 400 lines, and the GPU path imports none of the CPU-only
process placement (`serving/cpu/`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("serving", "router")
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def import_graph() -> dict[str, set[str]]:
    """Every project module and the project modules it imports, at module level or inside functions."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for name in names:
                target = resolve(name)
                if target and target != mod and not mod.startswith(target + "."):  # a package's own __init__
                    graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_over_400_lines() -> None:
    long = {str(p.relative_to(REPO)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_gpu_path_imports_none_of_the_cpu_placement() -> None:
    """What a GPU deployment loads (the app, the tier replica, the ingress, the vLLM engine) leaves
    `serving.cpu` unimported; only a CPU tier's replica imports it, when it places its engine."""
    code = ("import sys; import serving.app, serving.channel.replica, serving.ingress.app, serving.engines.vllm, "
            "serving.launch, serving.cli; print(sorted(m for m in sys.modules if m.startswith('serving.cpu')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


def test_test_files_have_unique_names():
    """pytest imports test files by their base name (no __init__.py in tests/): two files of one name in different
    folders stop the whole run at collection."""
    seen: dict[str, Path] = {}
    clashes = []
    for f in sorted((REPO / "tests").rglob("test_*.py")):
        if f.name in seen:
            clashes.append(f"{seen[f.name].relative_to(REPO)} and {f.relative_to(REPO)}")
        seen.setdefault(f.name, f)
    assert not clashes, "rename one of each: " + "; ".join(clashes)
