"""MkDocs hooks: the reference pages generated from the code itself.

A page holds a marker such as ``<!-- generated: cli -->`` and gets, in its place, what the
code says today: the CLI from its argparse parsers, every setting from the Settings model,
the HTTP API from its OpenAPI document. Nothing here is written by hand twice, so the
reference cannot drift from the program. ``openapi.json`` is written into the site too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

from mkdocs.structure.files import File, Files

MARKER = re.compile(r"<!-- generated: (?P<what>[a-z-]+) -->")


def cli_reference() -> str:
    from rmqdelay.cli.main import build_parser

    parser = build_parser()
    out = ["## rmqdelay", "", "```text", _help(parser, "rmqdelay"), "```", ""]
    for name, sub in _subcommands(parser):
        out += _command(f"rmqdelay {name}", sub)
    return "\n".join(out)


def _command(prog: str, parser: argparse.ArgumentParser) -> list[str]:
    level = "#" * min(2 + prog.count(" "), 4)
    out = [f"{level} {prog}", "", "```text", _help(parser, prog), "```", ""]
    for name, sub in _subcommands(parser):
        out += _command(f"{prog} {name}", sub)
    return out


def _help(parser: argparse.ArgumentParser, prog: str) -> str:
    parser.prog = prog
    # A fixed width (argparse reads COLUMNS): the same page whatever built it, and one
    # that fits the code box of the page without scrolling.
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "76"
    try:
        return parser.format_help().rstrip()
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:  # argparse keeps its subparsers nowhere public
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def settings_reference() -> str:
    from pydantic import SecretStr

    from rmqdelay.settings import Settings

    rows = ["| variable | default | what it sets |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            shown = "(secret)"
        elif default is None:
            shown = "(unset)"
        else:
            shown = f"`{_plain(default)}`"
        rows.append(f"| `RMQDELAY_{name.upper()}` | {shown} | {_cell(field.description)} |")
    return "\n".join(rows)


def _plain(value: Any) -> str:
    from datetime import timedelta

    from rmqdelay.core.delays import describe_us

    if isinstance(value, timedelta):
        return describe_us(value // timedelta(microseconds=1))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).replace("|", "\\|")


def openapi_document() -> dict[str, Any]:
    from rmqdelay.settings import Settings
    from rmqdelay.web.api import create_app

    return create_app(Settings(_env_file=None)).openapi()  # type: ignore[call-arg]


def http_reference() -> str:
    document = openapi_document()
    out = [
        f"OpenAPI {document['openapi']}, API version {document['info']['version']}; the whole "
        "document: [openapi.json](openapi.json) (a running server serves it at "
        "`/openapi.json`).",
        "",
    ]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            out += _operation(f"{method.upper()} {path}", operation)
    schemas = document.get("components", {}).get("schemas", {})
    if schemas:
        out += ["## Schemas", ""]
        for name, schema in schemas.items():
            out += _schema(name, schema)
    return "\n".join(out)


def _cell(text: object) -> str:
    return str(text or "").replace("\n", " ").replace("|", "\\|")


def _operation(title: str, operation: dict[str, Any]) -> list[str]:
    out = [f"## {title}", ""]
    out += [f"**{operation['summary']}**", ""] if operation.get("summary") else []
    out += [operation["description"].strip(), ""] if operation.get("description") else []
    parameters = operation.get("parameters", [])
    if parameters:
        out += ["| parameter | in | required | what |", "|---|---|---|---|"]
        out += [
            f"| `{p['name']}` | {p['in']} | {p.get('required', False)} | "
            f"{_cell(p.get('description'))} |"
            for p in parameters
        ]
        out.append("")
    for media, content in operation.get("requestBody", {}).get("content", {}).items():
        out += [f"Request body ({media}): `{_schema_name(content.get('schema', {}))}`", ""]
    out += ["| status | what |", "|---|---|"]
    out += [
        f"| {status} | {_cell(response.get('description'))} |"
        for status, response in operation.get("responses", {}).items()
    ]
    return [*out, ""]


def _schema(name: str, schema: dict[str, Any]) -> list[str]:
    out = [f"### {name}", ""]
    out += [schema["description"].strip(), ""] if schema.get("description") else []
    required = set(schema.get("required", []))
    props = schema.get("properties", {})
    if props:
        out += ["| field | type | required | what |", "|---|---|---|---|"]
        out += [
            f"| `{field}` | {_cell(_schema_name(spec))} | {field in required} | "
            f"{_cell(spec.get('description'))} |"
            for field, spec in props.items()
        ]
        out.append("")
    return out


def _schema_name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " or ".join(_schema_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_schema_name(schema.get('items', {}))}"
    return str(schema.get("type", "any"))


GENERATORS = {"cli": cli_reference, "settings": settings_reference, "http": http_reference}


def on_page_markdown(markdown: str, **_: Any) -> str:
    return MARKER.sub(lambda m: GENERATORS[m.group("what")](), markdown)


def on_files(files: Files, config: Any) -> Files:
    document = json.dumps(openapi_document(), indent=2) + "\n"
    files.append(File.generated(config, "reference/openapi.json", content=document))
    return files
