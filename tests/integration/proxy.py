"""A TCP proxy in front of the broker whose connections a test can cut."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from urllib.parse import urlsplit, urlunsplit


class Proxy:
    """Forwards 127.0.0.1:<port> to the broker; ``cut()`` drops every open connection."""

    def __init__(self, broker_url: str, *, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: terminate TLS with this server context (clients then use amqps://)."""
        parts = urlsplit(broker_url)
        self._tls = tls
        self._target = (parts.hostname or "localhost", parts.port or 5672)
        self._url = parts
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        #: Cleared by ``stall``: bytes stop flowing, connections stay open.
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._tls)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def down(self) -> None:
        """Cut every connection and refuse new ones, as a dead broker host would."""
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    async def up(self) -> None:
        """Accept connections again, on the same port."""
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self._port, reuse_address=True, ssl=self._tls
        )

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        """The broker URL, pointed at the proxy."""
        port = self._port
        creds = self._url.netloc.rpartition("@")[0]
        netloc = f"{creds}@127.0.0.1:{port}" if creds else f"127.0.0.1:{port}"
        scheme = "amqps" if self._tls else self._url.scheme
        return urlunsplit(self._url._replace(netloc=netloc, scheme=scheme))

    def stall(self) -> None:
        """Stop forwarding, both ways, and keep every connection open: a peer gone silent
        (a cut cable, a partition), which no socket error reports."""
        self._flowing.clear()

    def resume(self) -> None:
        """Forward again what waited."""
        self._flowing.set()

    def cut(self) -> None:
        """Abort every connection through the proxy, as a network failure would."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        broker_r, broker_w = await asyncio.open_connection(*self._target)
        self._writers |= {client_w, broker_w}
        await asyncio.gather(
            self._pipe(client_r, broker_w), self._pipe(broker_r, client_w), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.transport.abort()
