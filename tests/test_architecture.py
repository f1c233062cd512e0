"""The layout ARCHITECTURE.md promises: imports point down the data flow, no cycles, pure modules stay pure.

Reads the package's source with `ast` (imports inside functions count too); imports nothing of lookalike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "lib" / "lookalike"

# Layers, lowest first: a module may import its own layer or lower ones. similar, recommend and search are siblings.
LAYERS = [
    {"errors", "results", "storage"},
    {"config", "session", "progress", "distributor"},
    {"embed"},
    {"index"},
    {"similar", "recommend", "search"},
    {"train"},
    {"run", "report", "demo_data"},
    {"cli"},
]
# The one import against the layers: config checks model.name against the registry (pure data, no torch) so
# that a bad model is refused before Spark starts.
ALLOWED_UPWARD = {("lookalike.config", "lookalike.embed.models.registry")}
PURE = [
    "index.params",
    "similar.search",
    "similar.plan",
    "recommend.taste",
    "recommend.scoring",
    "recommend.covisit",
    "embed.decode",
    "embed.fetcher",
    "train.fit",
    "train.textmap",
    "train.losses",
    "embed.models.fusion",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, as absolute names (`from lookalike.x import y` is lookalike.x.y when y is
    a module of the package, else lookalike.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                candidate = PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")
                is_module = candidate.with_suffix(".py").exists() or candidate.is_dir()
                found.add(f"{node.module}.{alias.name}" if is_module else node.module)
    return found


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(LAYERS) if top in names)


def own(names: set[str]) -> set[str]:
    return {name for name in names if name.startswith("lookalike.") and name in GRAPH}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "lookalike"))
def test_imports_point_down_the_flow(module: str) -> None:
    upward = {
        target
        for target in own(GRAPH[module])
        if target != "lookalike" and layer(target) > layer(module) and (module, target) not in ALLOWED_UPWARD
    }
    assert not upward, f"{module} imports {sorted(upward)}, which sit above it (ARCHITECTURE.md)"
    siblings = ("lookalike.similar", "lookalike.recommend", "lookalike.search")
    mine = next((package for package in siblings if module.startswith(package)), None)
    if mine is not None:
        others = tuple(package for package in siblings if package != mine)
        assert not {t for t in own(GRAPH[module]) if t.startswith(others)}


def test_no_import_cycles() -> None:
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(own(GRAPH[module]) - {"lookalike"}):
            if state.get(target) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_storage_imports_nothing_of_the_stages() -> None:
    for module, targets in GRAPH.items():
        if module.startswith("lookalike.storage"):
            assert own(targets) <= {n for n in GRAPH if n.startswith("lookalike.storage")} | {"lookalike.errors"}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_neither_spark_nor_storage(module: str) -> None:
    targets = GRAPH[f"lookalike.{module}"]
    assert not {t for t in targets if t.startswith(("pyspark", "lookalike.storage", "deltalake"))}
