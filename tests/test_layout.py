"""The package layout: data flows one way, read from every module's own imports."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

#: Layers in the order data flows; a module may import its own package and lower layers only.
LAYERS: dict[str, int] = {
    "data": 0, "metrics": 0,
    "networks": 1, "crf": 1,
    "models": 2, "distributed": 2,
    "engines": 3, "inference": 3, "transforms": 3,
    "evaluation": 4,
    "reports": 5,
    "workflow": 6,
    "bundle": 7, "demo": 7, "deploy": 7,
    "cli": 8,
}
#: House rules beyond the layers: the CRF is the method on its own.
FORBIDDEN: dict[str, set[str]] = {"crf": {"data", "networks", "metrics"}}


def _imports(path: Path) -> set[str]:
    """Top-level ``pipeline`` sub-packages a module imports, also inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "pipeline" and len(parts) > 1:
                found.add(parts[1])
    return found


def _package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_package_has_a_layer():
    packages = {_package_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert packages == set(LAYERS)


def test_data_flows_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _package_of(path)
        if own == "__init__":
            continue
        for target in _imports(path) - {own}:
            if LAYERS[target] >= LAYERS[own] or target in FORBIDDEN.get(own, set()):
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports pipeline.{target}")
    assert wrong == []


def test_the_layout_check_catches_an_arrow_against_the_flow(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pipeline.reports.render import render_html\n")
    assert _imports(bad) == {"reports"}
    assert LAYERS["reports"] > LAYERS["inference"]
