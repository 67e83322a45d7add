"""Two brokers at once: the source (RMQDELAY_TEST_URL) and the target
(RMQDELAY_TEST_TARGET_URL), for the transfer from one RabbitMQ version to another.

.ci/run starts RabbitMQ 3.10 as the source and 4.3 as the target. Without a target URL the
tests skip, unless RMQDELAY_TEST_REQUIRE_TARGET=1 (set in CI's 3.10 stage), where they fail
instead: a stage that means to run them must not pass without them.
"""

from __future__ import annotations

import os

import pytest

# The source broker, found as every integration test finds its broker.
from tests.integration.conftest import broker_url, test_broker  # noqa: F401

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def target_url() -> str:
    url = os.environ.get("RMQDELAY_TEST_TARGET_URL", "").strip()
    if url:
        return url
    reason = "RMQDELAY_TEST_TARGET_URL is not set: the transfer tests need a second broker"
    if os.environ.get("RMQDELAY_TEST_REQUIRE_TARGET") == "1":
        pytest.fail(reason)
    pytest.skip(reason)
