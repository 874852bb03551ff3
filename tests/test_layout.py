"""The package's layout rules: no import cycles (lazy imports inside functions count too),
metrics on arrays only, and one place that opens a user's raster."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "idgbr_geo"


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its code (``from . import x``
    of a submodule counts as importing the submodule, not its package)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, (path, package) in mods.items():
        here = name if package else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = here.split(".")[: len(here.split(".")) - node.level + 1] if node.level \
                    else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = {f"{target}.{a.name}" for a in node.names} & mods.keys()
                found.update(subs)
                if target in mods and len(subs) < len(node.names):
                    found.add(target)
        graph[name] = found - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    # imports inside functions count (a lazy import hides a cycle, it does not break it)
    assert "idgbr_geo.engine" in graph["idgbr_geo.batch.jobs"]
    assert "idgbr_geo.batch.cluster" in graph["idgbr_geo.batch"]
    assert cycles(graph) == []


def test_metrics_work_on_arrays_only():
    """Raster and vector I/O live in evaluate.py, which builds on metrics, never the reverse."""
    graph = import_graph()
    assert "idgbr_geo.metrics" in graph["idgbr_geo.evaluate"]
    assert graph["idgbr_geo.metrics"] <= {"idgbr_geo.errors"}
    text = (PACKAGE / "metrics.py").read_text()
    assert "rasterio" not in text and "geopandas" not in text


def test_one_place_opens_a_users_raster():
    """Every read-only ``rasterio.open`` is rasters.open_raster's (one error for all);
    writing.py opens the files it writes."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "open" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "rasterio"):
                found.append(rel)
    assert set(found) == {"rasters.py", "writing.py"}, found
