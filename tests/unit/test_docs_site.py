"""The docs site builds with ``mkdocs build --strict`` (every link and reference resolves),
and its reference pages, generated from the code, cover all of it."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rmqdelay
from rmqdelay.cli.main import build_parser
from rmqdelay.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _text(site: Path, page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", (site / page / "index.html").read_text()))


def test_the_api_reference_documents_every_public_name(site: Path) -> None:
    page = (site / "reference" / "api" / "index.html").read_text()
    missing = [name for name in rmqdelay.__all__ if f'id="rmqdelay.{name}"' not in page
               and f'id="rmqdelay.core.errors.{name}"' not in page]  # fmt: skip
    assert not missing


def test_the_cli_reference_has_every_command_and_option(site: Path) -> None:
    text = _text(site, "reference/cli")
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[union-attr]
    for name, sub in commands.items():
        assert f"rmqdelay {name}" in text
        for action in sub._actions:
            for option in action.option_strings:
                assert option in text, f"rmqdelay {name} {option}"


def test_the_settings_reference_has_every_setting(site: Path) -> None:
    text = _text(site, "reference/settings")
    missing = [n for n in Settings.model_fields if f"RMQDELAY_{n.upper()}" not in text]
    assert not missing


def test_the_http_reference_has_every_route_and_the_openapi_document(site: Path) -> None:
    document = json.loads((site / "reference" / "openapi.json").read_text())
    text = _text(site, "reference/http")
    for path, operations in document["paths"].items():
        for method in operations:
            assert f"{method.upper()} {path}" in text


def test_the_changelog_page_is_the_changelog(site: Path) -> None:
    first = (ROOT / "CHANGELOG.md").read_text().splitlines()[6]
    assert first.lstrip("# ") in _text(site, "changelog")
