"""The package's shape: no import circle among its modules, and nothing imports the entry point."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fmi_bridge"
FAMILIES = {"mqtt", "sinks", "container", "commands"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_at_load(path: Path) -> set[str]:
    """Modules this file imports when it is loaded (module level, outside `if TYPE_CHECKING:`)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def import_graph() -> dict[str, set[str]]:
    files = [*PACKAGE.rglob("*.py"), ROOT / "mqtt_subscriber.py"]
    modules = {module_name(path): path for path in files}
    return {name: imports_at_load(path) & modules.keys() - {name} for name, path in modules.items()}


def test_no_module_imports_another_that_imports_it_back() -> None:
    graph = import_graph()
    circles: list[list[str]] = []

    def visit(name: str, trail: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in trail:
                circles.append([*trail[trail.index(target) :], target])
            elif target not in seen:
                seen.add(target)
                visit(target, [*trail, target])

    seen: set[str] = set()
    for start in sorted(graph):
        if start not in seen:
            seen.add(start)
            visit(start, [start])
    assert circles == []


def test_nothing_imports_the_entry_point() -> None:
    importers = [name for name, targets in import_graph().items() if "mqtt_subscriber" in targets]
    assert importers == []


def test_the_package_top_holds_the_core_and_the_four_families() -> None:
    folders = {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").exists()}
    assert folders == FAMILIES
    tests = {path.name for path in (ROOT / "tests").iterdir() if path.is_dir() and (path / "__init__.py").exists()}
    assert tests >= FAMILIES
