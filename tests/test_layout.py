"""The shape of the code base, checked: sidenet's modules form layers (core, analysis, demo, with
serving on top) that import only downwards, without cycles; no module runs past ~400 lines without
saying why at its top; the benchmarks use the public library only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "sidenet"

# Each module's layer; a module may import (at module level) only from its own layer or lower ones.
# Imports inside functions (the CLI importing the report on demand, a lazy torch-heavy import) are
# not dependencies of the module's import and are not counted.
CORE = 0
ANALYSIS = 1
DEMO = 2
SERVING = 3
LAYERS: dict[str, int] = {
    "errors": CORE,
    "policy": CORE,
    "head": CORE,
    "flops": CORE,
    "monitor": CORE,
    "loaders": CORE,
    "splits": CORE,
    "models": CORE,
    "config": CORE,
    "outputs": CORE,
    "routing": CORE,
    "checkpoint": CORE,
    "attach": CORE,
    "training": CORE,
    "record": CORE,
    "curve": CORE,
    "cascade_curve": CORE,
    "cascade_choice": CORE,
    "cascade_record": CORE,
    "saved_folder": CORE,
    "guarantee": CORE,
    "plotting": CORE,
    "paths": CORE,
    "placement": CORE,
    "calibration": ANALYSIS,
    "shift": ANALYSIS,
    "timing": ANALYSIS,
    "part_costs": ANALYSIS,
    "routing_steps": ANALYSIS,
    "time_forecast": ANALYSIS,
    "report": ANALYSIS,
    "report_page": ANALYSIS,
    "report_data": ANALYSIS,
    "report_cascade": ANALYSIS,
    "report_cascade_page": ANALYSIS,
    "datasets": DEMO,
    "data": DEMO,
    "pretrain": DEMO,
    "text_pretrain": DEMO,
    "tasks": DEMO,
    "cli": DEMO,
    "cli_options": DEMO,
    "cli_fit": DEMO,
    "cli_serve": DEMO,
    "cli_report": DEMO,
    "__main__": DEMO,
    "audit": ANALYSIS,
    "serving": SERVING,
    "compiled": SERVING,
    "compiled_stages": SERVING,
    "compiled_warmup": SERVING,
    "cuda_graphs": SERVING,
    "host_memory": SERVING,
    "integrations": SERVING,
}
LAYER_NAMES = {CORE: "core", ANALYSIS: "analysis", DEMO: "demo", SERVING: "serving"}
MAX_LINES = 400


def module_name(path: Path) -> str:
    """``sidenet.splits.base`` for src/sidenet/splits/base.py; packages by their __init__."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level(name: str) -> str:
    """The first component below ``sidenet`` (``splits`` for ``sidenet.splits.base``)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_level_imports(path: Path) -> set[str]:
    """The sidenet modules imported at module level (not in functions, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = module_name(path)
    is_package = path.name == "__init__.py"

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("sidenet"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = package.split(".")
                    base = base if is_package else base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                if target.startswith("sidenet"):
                    found.add(target)
                    # `from sidenet import x` may name a submodule
                    found.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules}


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer() -> None:
    unknown = sorted({top_level(name) for name in MODULES if name != "sidenet"} - set(LAYERS))
    assert not unknown, f"give these modules a layer in tests/test_layout.py: {unknown}"


@pytest.mark.parametrize("name", [name for name in MODULES if name != "sidenet"])
def test_modules_import_only_their_layer_or_lower(name: str) -> None:
    layer = LAYERS[top_level(name)]
    upward = sorted(
        target
        for target in module_level_imports(MODULES[name])
        if target != "sidenet" and LAYERS[top_level(target)] > layer
    )
    assert not upward, f"{name} ({LAYER_NAMES[layer]}) imports from a higher layer at module level: {upward}"


def test_no_import_cycles() -> None:
    graph = {name: module_level_imports(path) - {name} for name, path in MODULES.items()}
    # The package's own __init__ re-exports the public API; a submodule importing `sidenet` itself
    # would be the cycle to catch, so the package stays in the graph.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize(
    "path", sorted([*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]), ids=lambda p: p.name
)
def test_long_modules_say_why(path: Path) -> None:
    lines = path.read_text().count("\n")
    if lines > MAX_LINES:
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "Long because" in docstring, (
            f"{path.relative_to(ROOT)} has {lines} lines: split it, or say at its top why not ('Long because ...')"
        )


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").rglob("*.py")), ids=lambda p: p.name)
def test_benchmarks_use_the_public_library_only(path: Path) -> None:
    """A harness over the library, not a second one: no sys.path edits, no private sidenet names."""
    text = path.read_text()
    assert "sys.path" not in text, f"{path.name} edits sys.path; run it as python -m benchmarks.NAME"
    private = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sidenet"):
            if any(part.startswith("_") for part in node.module.split(".")):
                private.append(node.module)
            private += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = ast.unparse(node.value)
            if base.startswith("sidenet"):
                private.append(f"{base}.{node.attr}")
    assert not private, f"{path.name} uses private library names: {sorted(set(private))}"
