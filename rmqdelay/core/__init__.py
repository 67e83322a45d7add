"""The pure core: wire format, delay arithmetic, routes, topology as data, retry policy.

No I/O here, and importing aio-pika (or any network library) is a lint error
(``rmqdelay/core/ruff.toml``): everything in this package is tested without a broker.
"""
