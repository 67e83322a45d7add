from datetime import timedelta

import pytest

from rmqdelay import ConfigError, Settings
from rmqdelay.core.errors import InvalidDestinationError
from rmqdelay.core.names import Names
from rmqdelay.core.redact import redact_url, split_urls


def test_defaults() -> None:
    s = Settings(_env_file=None)
    assert (s.namespace, s.queue_type, s.resolution_ms) == ("rmqdelay", "quorum", 1024)
    # room to run 16 handlers and hold the default window (16 s) of early tasks at 4,000/s
    assert s.hold_window_s == 16.0
    assert s.prefetch_for(16) == 16 + 64_000
    assert Settings(_env_file=None, prefetch=7).prefetch_for(16) == 7
    assert s.max_delay == timedelta(days=3653)
    assert s.declare is True


def test_a_hold_window_sets_how_early_tasks_arrive_and_the_room_to_hold_them() -> None:
    s = Settings(_env_file=None, hold_window="4s")
    assert s.hold_window_s == 4.0
    assert s.prefetch_for(16) == 16 + 16_000
    assert s.limits.whole_units(3_900_000) == 0, "due within the window: straight to work"
    assert s.limits.whole_units(7_500_000) == 4, "one hop (4 units), held 3.4 s"
    assert Settings(_env_file=None, hold_window="1024ms").limits.whole_units(7_500_000) == 7, (
        "three hops"
    )
    assert Settings(_env_file=None).limits.whole_units(15_900_000) == 0, "default: 16 s"
    coarse = Settings(_env_file=None, resolution_ms=30_000)
    assert coarse.hold_window_s == 30.0, "never less than one unit"
    for wrong, fragment in (("500ms", "from the resolution (1024 ms"), ("2m", "to 1m")):
        with pytest.raises(ConfigError, match="hold_window") as info:
            Settings(_env_file=None, hold_window=wrong)
        assert fragment in str(info.value)


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
        ({"max_delay": "7000d"}, "RMQDELAY_MAX_DELAY"),  # top level over 10 x 365 days
        ({"prefetch": 0}, "RMQDELAY_PREFETCH"),
        ({"url": "http://h/"}, "RMQDELAY_URL"),
        ({"heartbeat": "0.5s"}, "RMQDELAY_HEARTBEAT.*whole seconds.*not 0.5s"),
        ({"heartbeat": "0s"}, "RMQDELAY_HEARTBEAT"),
        ({"heartbeat": "11m"}, "RMQDELAY_HEARTBEAT.*not 660s"),
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
    [
        ("", "non-empty"),
        (None, "non-empty"),
        ("a\nb", r"contains '\\n'"),
        ("x" * 300, "300 bytes"),
        ("café", "contains 'é'"),
        ("告警", "contains '告', '警'"),
        ("a*b", r"contains '\*'"),
        ("a b", "may hold only letters A-Z a-z, digits"),
    ],
)
def test_bad_destinations_are_refused(destination: object, fragment: str) -> None:
    with pytest.raises(InvalidDestinationError, match=fragment):
        Names("ns").check_destination(destination)


@pytest.mark.parametrize("destination", ["alarms", "billing.invoices", "team-a:high_prio", "A9"])
def test_destinations_of_amqp_name_characters_are_accepted(destination: str) -> None:
    assert Names("ns").check_destination(destination) == destination


@pytest.mark.parametrize(
    ("url", "bad"),
    [
        ("amqp://guest:p@ss#word@host/", "'#' as %23, '@' as %40"),
        ("amqp://u:p[ss@host/", "'[' as %5B"),
        ("amqp://u:50%off@host/", "'%' as %25"),
        ("amqp://u:a/b?c@host/", "'/' as %2F, '?' as %3F"),
    ],
)
def test_unencoded_password_characters_are_refused_without_showing_the_password(
    url: str, bad: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(_env_file=None, url=url)
    message = str(info.value)
    assert bad in message
    assert message.count("\n") == 0
    for fragment in ("ss#word", "p[ss", "50%off", "a/b?c"):
        assert fragment not in message
    assert info.value.__cause__ is None, "pydantic's own text would repeat the URL"


@pytest.mark.parametrize(
    "url",
    [
        "amqp://guest:p@ss#word@host/x",
        "amqp://u:p[ss@h:5672/%2F",
        "amqp://u:a/b?c#d@h/",
        "amqps://user:s3cret@h/vh?heartbeat=5",
    ],
)
def test_redact_url_hides_any_password(url: str) -> None:
    redacted = redact_url(url)
    assert ":******@" in redacted
    for secret in ("p@ss#word", "p[ss", "a/b?c#d", "s3cret"):
        assert secret not in redacted


def test_a_percent_encoded_password_is_accepted() -> None:
    assert Settings(_env_file=None, url="amqp://u:p%40ss%23w@host/").url.endswith("@host/")


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


def test_the_journal_retention_leaves_the_keeper_room_and_the_cancels_cap_it() -> None:
    assert Settings(_env_file=None, journal_retention="1m").layout.journal_retention_s == 60
    assert Settings(_env_file=None, max_delay="1h").layout.journal_retention_s == 3600
    with pytest.raises(ConfigError, match=r"journal_retention=0:00:59 is under 0:01:00"):
        Settings(_env_file=None, journal_retention="59s")


def test_reconnect_waits_grow_with_the_outage_up_to_a_cap() -> None:
    from rmqdelay.broker.connection import RECONNECT_FIRST_S, RECONNECT_MAX_S, reconnect_wait

    waits = [reconnect_wait(s) for s in (0, 1, 4, 10, 60, 3600)]
    assert waits[0] == RECONNECT_FIRST_S
    assert waits == sorted(waits)
    assert waits[-1] == RECONNECT_MAX_S


def test_a_comma_separated_url_lists_the_nodes_of_a_cluster() -> None:
    s = Settings(
        _env_file=None,
        url="amqp://u:one,1@n1:5681/%2F , amqp://u:two@n2:5682/%2F,amqp://u:three@n3/%2F",
    )
    # A comma inside a password stays there: only a comma before a scheme separates URLs.
    assert s.urls == (
        "amqp://u:one,1@n1:5681/%2F",
        "amqp://u:two@n2:5682/%2F",
        "amqp://u:three@n3/%2F",
    )
    for secret in ("one,1", "two", "three"):
        assert f":{secret}@" not in s.safe_url
        assert f":{secret}@" not in repr(s)
    assert s.safe_url.count(":******@") == 3
    assert split_urls("amqp://h/") == ["amqp://h/"]
    assert split_urls("amqp://h/%2F, ") == ["amqp://h/%2F"]


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("amqp://u:p@n1/%2F,http://u:s3cret@n2/", "URL 2 of 2 must start with amqp://"),
        ("amqp://u:p@n1/%2F,amqp://u:s3cret@/%2F", "URL 2 of 2 names no host"),
        ("amqp://n1/%2F,amqps://u:s3cret@n2/%2F", "mixes amqp:// and amqps://"),
        ("amqp://n1/a,amqp://u:s3cret@n2/b", "names different vhosts"),
        ("  ", "is empty"),
    ],
)
def test_a_bad_url_list_names_the_bad_url_and_hides_passwords(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        Settings(_env_file=None, url=url)
    assert "s3cret" not in str(info.value)
