from datetime import timedelta

import pytest

from rmqdelay import ConfigError, Settings
from rmqdelay.errors import InvalidDestinationError
from rmqdelay.names import Names
from rmqdelay.settings import redact_url


def test_defaults() -> None:
    s = Settings(_env_file=None)
    assert (s.namespace, s.queue_type, s.resolution_ms) == ("rmqdelay", "quorum", 10)
    assert s.max_delay == timedelta(days=3653)
    assert s.declare is True


def test_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMQDELAY_NAMESPACE", "billing")
    monkeypatch.setenv("RMQDELAY_MAX_DELAY", "30d")
    monkeypatch.setenv("RMQDELAY_QUEUE_TYPE", "classic")
    monkeypatch.setenv("RMQDELAY_DECLARE", "false")
    s = Settings(_env_file=None)
    assert (s.namespace, s.queue_type, s.declare) == ("billing", "classic", False)
    assert s.max_delay == timedelta(days=30)


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"namespace": "has space"}, "RMQDELAY_NAMESPACE"),
        ({"namespace": ""}, "RMQDELAY_NAMESPACE"),
        ({"resolution_ms": 0}, "RMQDELAY_RESOLUTION_MS"),
        ({"queue_type": "stream"}, "RMQDELAY_QUEUE_TYPE"),
        ({"max_delay": "forever"}, "RMQDELAY_MAX_DELAY"),
        ({"max_delay": "0s"}, "RMQDELAY_MAX_DELAY"),
        ({"max_delay": "4000d"}, "RMQDELAY_MAX_DELAY"),
        ({"prefetch": 0}, "RMQDELAY_PREFETCH"),
        ({"url": "http://h/"}, "RMQDELAY_URL"),
    ],
)
def test_invalid_settings_name_the_variable(values: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Settings(_env_file=None, **values)


def test_passwords_never_appear_in_repr_or_errors() -> None:
    s = Settings(_env_file=None, url="amqp://app:s3cret@broker:5672/prod")
    assert "s3cret" not in repr(s)
    assert "s3cret" not in s.safe_url
    with pytest.raises(ConfigError) as info:
        Settings(_env_file=None, url="http://app:s3cret@broker/")
    assert "s3cret" not in str(info.value)
    assert redact_url("amqp://h/") == "amqp://h/"


@pytest.mark.parametrize(
    ("destination", "fragment"),
    [("", "non-empty"), (None, "non-empty"), ("a\nb", "control"), ("x" * 300, "300 bytes")],
)
def test_bad_destinations_are_refused(destination: object, fragment: str) -> None:
    with pytest.raises(InvalidDestinationError, match=fragment):
        Names("ns").check_destination(destination)


def test_longest_destination_fits_an_amqp_name() -> None:
    names = Names("ns")
    longest = "d" * names.max_destination_bytes
    assert len(names.work_queue(names.check_destination(longest)).encode()) == 255
    with pytest.raises(InvalidDestinationError):
        names.check_destination(longest + "d")


def test_cancel_retention_defaults_to_the_max_delay_and_may_not_be_shorter() -> None:
    s = Settings(_env_file=None, max_delay="30d")
    assert s.retention == timedelta(days=30)
    assert s.layout.cancel_retention_s == 30 * 86400
    assert Settings(_env_file=None, max_delay="30d", cancel_retention="60d").retention == (
        timedelta(days=60)
    )
    with pytest.raises(ConfigError, match="forgotten before the task"):
        Settings(_env_file=None, max_delay="30d", cancel_retention="7d")


def test_reconnect_waits_grow_with_the_outage_up_to_a_cap() -> None:
    from rmqdelay.connection import RECONNECT_FIRST_S, RECONNECT_MAX_S, reconnect_wait

    waits = [reconnect_wait(s) for s in (0, 1, 4, 10, 60, 3600)]
    assert waits[0] == RECONNECT_FIRST_S
    assert waits == sorted(waits)
    assert waits[-1] == RECONNECT_MAX_S
