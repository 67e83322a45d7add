"""The command line's client of ``rmqdelay serve``: what it refuses before any call."""

from __future__ import annotations

import re

import pytest

from rmqdelay.core.errors import BrokerUnavailableError, ConfigError
from rmqdelay.tools.api_client import ApiClient


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("amqp://localhost:8080", "must be http(s)://host:port"),
        ("localhost:8080", "must be http(s)://host:port"),
        ("http://", "must be http(s)://host:port"),
        ("http://admin:hunter2@localhost:8080", "must not hold credentials"),
    ],
)
def test_an_api_url_that_is_not_one_is_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        ApiClient(url, "token")
    assert "hunter2" not in str(refused.value)


def test_an_api_that_does_not_answer_is_named_without_its_path() -> None:
    client = ApiClient("http://127.0.0.1:9/secret-path?token=x", None)
    with pytest.raises(BrokerUnavailableError, match=r"http://127\.0\.0\.1:9 \(") as failed:
        client.get("/v1/tasks")
    assert "secret-path" not in str(failed.value)
    assert "token=x" not in str(failed.value)
