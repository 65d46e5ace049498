"""The layers: the shared core (`splitspec/`) imports no service, and no service imports the
composition root (`entrypoints/`), which alone composes them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("coordinator", "target_worker", "draft_worker", "gateway")


def imported_packages(package: str) -> dict[str, set[str]]:
    """Each module file of `package` -> the top-level packages it imports (at any depth in the file)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_the_shared_core_imports_no_service_and_not_the_entrypoints():
    offending = {path: sorted(names & {*SERVICES, "entrypoints"})
                 for path, names in imported_packages("splitspec").items() if names & {*SERVICES, "entrypoints"}}
    assert not offending, offending


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_imports_the_entrypoints(service):
    offending = [path for path, names in imported_packages(service).items() if "entrypoints" in names]
    assert not offending, offending
    assert imported_packages(service), f"{service}/ has no modules: the layering check read nothing"


def test_the_entrypoints_compose_every_service():
    composed = set().union(*imported_packages("entrypoints").values())
    assert set(SERVICES) <= composed, sorted(set(SERVICES) - composed)
