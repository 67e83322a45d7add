"""Failover between the nodes of a URL list, without a broker."""

import aio_pika
from yarl import URL

from rmqdelay import Settings
from rmqdelay.broker.connection import BackoffRobustConnection, amqp_urls


def test_aio_pika_still_has_the_hook_failover_relies_on() -> None:
    # BackoffRobustConnection moves to the next node when an attempt fails by overriding
    # this private method; an aio-pika that renames it would silently stop failing over.
    assert callable(aio_pika.RobustConnection._RobustConnection__connect_transport)
    assert "_RobustConnection__connect_transport" in vars(BackoffRobustConnection)


async def test_next_url_walks_the_nodes_in_turn_and_wraps() -> None:
    urls = ("amqp://u:p@n1:5681/", "amqp://u:p@n2:5682/", "amqp://u:p@n3:5683/")
    connection = BackoffRobustConnection(URL(urls[1]))
    connection.fail_over(urls)
    seen = []
    for _ in range(4):
        connection.next_url()
        seen.append(connection.url.port)
    assert seen == [5683, 5681, 5682, 5683]


async def test_one_url_stays_put() -> None:
    connection = BackoffRobustConnection(URL("amqp://u:p@n1/"))
    connection.fail_over(("amqp://u:p@n1/",))
    connection.next_url()
    assert connection.url == URL("amqp://u:p@n1/")


def test_every_url_gets_the_heartbeat_unless_it_names_its_own() -> None:
    settings = Settings(
        _env_file=None,
        heartbeat="7s",
        url="amqp://u:p%40ss@n1:5681/%2F,amqp://n2/%2F?heartbeat=30,amqp://n3/%2F?frame_max=8192",
    )
    assert amqp_urls(settings) == (
        "amqp://u:p%40ss@n1:5681/%2F?heartbeat=7",  # the password and vhost as they were
        "amqp://n2/%2F?heartbeat=30",
        "amqp://n3/%2F?frame_max=8192&heartbeat=7",
    )
    assert Settings(_env_file=None).heartbeat.total_seconds() == 5
