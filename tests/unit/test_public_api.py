import inspect

import rmqdelay


def test_all_is_sorted_and_complete() -> None:
    assert rmqdelay.__all__ == sorted(rmqdelay.__all__)
    public = {
        name
        for name, value in vars(rmqdelay).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(rmqdelay.__all__)


def test_every_error_derives_from_the_root() -> None:
    errors = [getattr(rmqdelay, n) for n in rmqdelay.__all__ if n.endswith("Error")]
    assert all(issubclass(e, rmqdelay.RmqDelayError) for e in errors)
    assert issubclass(rmqdelay.ConfigError, ValueError)
    assert issubclass(rmqdelay.BrokerUnavailableError, ConnectionError)
