"""The layering of docs/architecture.md, checked on the source: which package may import which,
which third-party libraries each may use, that nothing outside ``models/`` names a model family,
and that no two files import each other, directly or round a cycle (lazy imports count).

The imports are read from the files' syntax trees (``ast``): nothing is imported to check them.
"""

from __future__ import annotations

import ast
import pathlib
import re
from collections import defaultdict

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "storysync_dist"

# What each layer may import of the project (docs/architecture.md, "Layers"). The small top-level
# modules every layer uses (errors, sizes, the cache folder, signals, the resident set) are allowed everywhere.
SHARED = {"errors", "sizes", "cache", "interrupts", "resident"}
ALLOWED = {
    "core": set(),
    "toyworld": set(),
    "io": {"core", "toyworld"},
    "story": {"core", "io"},
    "models": {"core", "toyworld"},
    "engine": {"core", "io", "story", "models"},
    "eval": {"core", "io", "story", "models", "engine", "toyworld", "distributed", "api"},
    "distributed": {"core", "io", "story", "models", "engine", "eval"},
    "api": {"core", "io", "story", "models", "engine", "distributed"},
    "arguments": {"core", "io", "story", "models", "engine", "eval"},
    "cli": {"api", "arguments", "eval", "io", "engine"},
    "spec": {"story"},
}
# Third-party libraries a layer must not import.
FORBIDDEN = {
    "core": {"ray", "diffusers", "transformers", "pyarrow", "fsspec"},
    "story": {"ray", "diffusers", "torch"},
    "io": {"ray", "diffusers", "torch"},
    "models": {"ray", "pyarrow", "fsspec"},
    "engine": {"ray"},
    "toyworld": {"ray", "diffusers", "torch"},
}
FAMILY_MODULES = {"unet", "unet_presets", "flux", "flux_presets", "kandinsky3"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path) -> list[str]:
    """Every module ``path`` imports, lazily or not, as absolute dotted names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append(target)
            # ``from . import x``: x may be a module of the package.
            found.extend(f"{target}.{alias.name}" for alias in node.names)
    return found


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {_module_name(p): p for p in FILES}
IMPORTS = {_module_name(p): _imports(p) for p in FILES}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else "storysync_dist"


def _project_edges() -> dict[str, set[str]]:
    """File -> the project files it imports (a name that is a package means its ``__init__``)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in IMPORTS.items():
        for target in targets:
            if target in MODULES and target != module:
                edges[module].add(target)
    return edges


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in IMPORTS.items() if _layer(module) == layer
        for target in targets
        if target.startswith("storysync_dist.") and _layer(target) not in {layer, *ALLOWED[layer], *SHARED}
        and target in MODULES
    )
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_uses_only_its_libraries(layer: str) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in IMPORTS.items() if _layer(module) == layer
        for target in targets if target.split(".")[0] in FORBIDDEN[layer]
    )
    assert not wrong, "\n".join(wrong)


def test_every_project_file_belongs_to_a_known_layer() -> None:
    assert {_layer(m) for m in MODULES} - {"storysync_dist"} <= set(ALLOWED) | SHARED


def test_nothing_outside_models_names_a_family() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in IMPORTS.items() if _layer(module) != "models"
        for target in targets
        if target.startswith("storysync_dist.models.") and target.split(".")[2] in FAMILY_MODULES
    )
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    """No file reaches itself through imports (Tarjan's strongly connected components)."""
    edges = _project_edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: two files importing each other are reported."""
    fake = {"storysync_dist.core.a": ["storysync_dist.core.b"], "storysync_dist.core.b": ["storysync_dist.core.a"]}
    monkeypatch.setitem(globals(), "IMPORTS", fake)
    monkeypatch.setitem(globals(), "MODULES", {m: pathlib.Path(m) for m in fake})
    with pytest.raises(AssertionError, match=re.escape("storysync_dist.core.a <-> storysync_dist.core.b")):
        test_no_import_cycles()
