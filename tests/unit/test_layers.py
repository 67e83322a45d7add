"""The package's layers import downwards only: core <- settings <- broker <- worker <- tools
<- web <- cli.

(ruff also keeps I/O libraries out of rmqdelay.core: rmqdelay/core/ruff.toml.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "rmqdelay"
ORDER = ["core", "settings", "broker", "worker", "tools", "web", "cli"]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "rmqdelay" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ORDER else None


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_no_import_runs_back_up(path: Path) -> None:
    own = _layer("rmqdelay." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    if own is None:
        return  # rmqdelay/__init__.py and __main__.py sit above every layer
    upward = sorted(
        module
        for module in _imports(path)
        if (layer := _layer(module)) is not None and ORDER.index(layer) > ORDER.index(own)
    )
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}) imports {upward} from above it"
