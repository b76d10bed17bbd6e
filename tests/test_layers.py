"""The layers stay as ARCHITECTURE.md draws them, read from the source with `ast`:

    model/, kernels/  <-  bench/  <-  train.py, agent/        (data/ under bench/ and train.py)

bench/ (the fixed library) imports neither train.py nor agent/; train.py and agent/ import
each other never; the trusted harness (train.py and what it imports of bench/) never
imports the research surface; and no module imports itself back through others.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "bench", "data", "model", "kernels")
# bench/ modules that import the surface on purpose: they run inside the sandbox (the
# worker, the profile's inner half) or test kernels (their tolerances are fixed).
SURFACE_SIDE = {"bench.worker", "bench.profile", "bench.kernel_testing", "bench.kernel_check",
                "bench.kernels_bench", "bench.gpu_check"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def local_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports (at any depth of the file, deferred ones too). A
    name imported from a package counts for its own module when it is one (`from . import
    dispatch` is an edge to kernels.dispatch, not back to the package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            subs = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t for t in subs if t in modules] or [base]
        else:
            continue
        found.update(t for t in targets if t.split(".")[0] in (*PACKAGES, "train"))
    return found


def graph() -> dict[str, set[str]]:
    files = [ROOT / "train.py", *(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))]
    modules = {module_name(p): p for p in files}
    edges = {}
    for name, path in modules.items():
        found = local_imports(path, set(modules))
        edges[name] = {t if t in modules else t.rpartition(".")[0] for t in found}
        edges[name] = {t for t in edges[name] if t in modules and t != name}
    return edges


def test_bench_imports_neither_the_harness_nor_the_engine():
    bad = {(m, t) for m, ts in graph().items() if m.startswith("bench")
           for t in ts if t == "train" or t.startswith("agent")}
    assert not bad, bad


def test_the_harness_and_the_engine_never_import_each_other():
    edges = graph()
    assert not {t for t in edges["train"] if t.startswith("agent")}
    assert not {(m, t) for m, ts in edges.items() if m.startswith("agent") for t in ts
                if t == "train"}


def test_the_trusted_harness_never_reaches_the_surface():
    """What train.py imports, and what that imports, holds no model/ or kernels/ module:
    the candidate's code runs only in the sandboxed workers."""
    edges, seen, todo = graph(), set(), ["train", "bench.score", "agent.cli"]
    while todo:
        m = todo.pop()
        if m in seen or m in SURFACE_SIDE:
            continue
        seen.add(m)
        todo += edges.get(m, ())
    assert not {m for m in seen if m.split(".")[0] in ("model", "kernels")}, sorted(seen)


def test_there_are_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                return [*path, m, t]
            if t not in state:
                cycle = visit(t, [*path, m])
                if cycle:
                    return cycle
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m, [])
            assert cycle is None, " -> ".join(cycle)


def test_the_graph_is_read():
    """The test above must see real edges, or it proves nothing."""
    edges = graph()
    assert "bench.protocol" in edges["train"] and "bench.sandbox" in edges["train"]
    assert "bench.surface" in edges["agent.workspace"]
