"""docker-compose.yml: its structure, since no Docker engine may be there to run it."""

import json
import re
from pathlib import Path
from typing import Any

import yaml

from rmqdelay.cli.main import build_parser
from rmqdelay.worker.handler import load_handler

ROOT = Path(__file__).resolve().parents[2]
TEXT = (ROOT / "docker-compose.yml").read_text()


def _interpolate(value: str) -> str:
    """What compose substitutes with no variables set (and a password given)."""
    value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", "secret", value)


COMPOSE: dict[str, Any] = yaml.safe_load(_interpolate(TEXT))
SERVICES = COMPOSE["services"]


def _config(name: str) -> str:
    content: str = COMPOSE["configs"][name]["content"]
    return content


def test_services_are_the_broker_and_a_worker() -> None:
    assert set(SERVICES) == {"rabbitmq", "worker"}
    assert SERVICES["worker"]["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}


def test_broker_has_management_prometheus_and_a_healthcheck_and_keeps_its_data() -> None:
    broker = SERVICES["rabbitmq"]
    assert broker["image"] == "rabbitmq:4.3-management"
    plugins = _config("enabled-plugins")
    assert "rabbitmq_management" in plugins
    assert "rabbitmq_prometheus" in plugins
    assert broker["healthcheck"]["test"][:2] == ["CMD", "rabbitmq-diagnostics"]
    assert "rabbitmq-data:/var/lib/rabbitmq" in broker["volumes"]
    assert "rabbitmq-data" in COMPOSE["volumes"]
    assert "hostname" in broker  # the data directory is named after the node


def test_definitions_are_loaded_at_boot_from_files_that_exist() -> None:
    broker = SERVICES["rabbitmq"]
    directory = re.search(r"^load_definitions = (\S+)$", _config("rabbitmq-conf"), re.M)
    assert directory is not None
    binds = [v.split(":") for v in broker["volumes"] if v.startswith("./")]
    assert binds, "nothing mounted from the repository"
    for source, *_ in binds:
        assert (ROOT / source).is_file(), f"{source} is mounted but does not exist"
    targets = {target: source for source, target, *_ in binds}
    definitions = [t for t, s in targets.items() if s == "./definitions.json"]
    assert definitions, "definitions.json is not mounted"
    assert definitions[0].startswith(directory.group(1) + "/")
    user_file = next(c for c in broker["configs"] if c["source"] == "broker-user")
    assert user_file["target"].startswith(directory.group(1) + "/")
    # the broker user is valid definitions JSON, with its password from the environment only
    users = json.loads(_config("broker-user"))
    assert users["users"][0]["password"] == "secret"
    assert "RMQDELAY_BROKER_PASSWORD:?" in TEXT


def test_the_delayed_message_plugin_has_a_commented_way_in() -> None:
    commented = [line for line in TEXT.splitlines() if line.lstrip().startswith("#")]
    assert any("rabbitmq_delayed_message_exchange" in line and ".ez:" in line for line in commented)
    assert any("rabbitmq_delayed_message_exchange]." in line for line in commented)


def test_the_worker_runs_a_real_rmqdelay_consume_command() -> None:
    worker = SERVICES["worker"]
    assert worker["entrypoint"] == ["rmqdelay"]
    args = build_parser().parse_args(worker["command"])
    assert args.command == "consume"
    assert args.destination == "alarms"
    assert callable(load_handler(args.handler))
    assert args.metrics_port == 9100
    assert "9100/healthz" in " ".join(worker["healthcheck"]["test"])
    env = worker["environment"]
    assert env["RMQDELAY_URL"].startswith("amqp://rmqdelay:secret@rabbitmq:5672/")
    assert env["RMQDELAY_BACKEND"] in {"levels", "plugin", "auto"}


def test_the_worker_image_is_built_from_this_package() -> None:
    build = SERVICES["worker"]["build"]
    assert build["context"] == "."
    copied = re.findall(r"^COPY (.+) /src/?\S*$", build["dockerfile_inline"], re.M)
    sources = [s for line in copied for s in line.split()]
    assert set(sources) == {"pyproject.toml", "README.md", "rmqdelay"}
    assert all((ROOT / s).exists() for s in sources)
    assert "pip install --no-cache-dir /src" in build["dockerfile_inline"]


def test_the_broker_gets_the_advanced_config_scripts_broker_uses() -> None:
    configs = {c["source"]: c["target"] for c in SERVICES["rabbitmq"]["configs"]}
    assert configs["advanced-config"] == "/etc/rabbitmq/advanced.config"
    source = ROOT / COMPOSE["configs"]["advanced-config"]["file"]
    assert source == ROOT / "scripts" / "advanced.config"
    assert "{dead_letter_worker_publisher_confirm_timeout, 10000}" in source.read_text()
    assert source.name in (ROOT / "scripts" / "lib" / "rabbitmq.sh").read_text()
