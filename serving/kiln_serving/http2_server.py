"""The gRPC port's listening socket and its HTTP/2 connections (http2.Connection): started on the server's event
loop, and stopped gracefully (no new streams, those in flight finished within a grace period)."""

import asyncio
import socket
import time

from kiln_serving import http2_wire
from kiln_serving.http2 import Connection


class Server:
    """The listening socket and its connections."""

    def __init__(self, settings: http2_wire.Settings) -> None:
        self.settings = settings
        self.connections: set[Connection] = set()
        self.server: asyncio.Server | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Connection(self.settings, self.connections), sock=sock)

    async def stop(self, grace_seconds: float) -> None:
        """Stop accepting, let streams in flight finish (up to grace_seconds), then close every connection."""
        if self.server is not None:
            self.server.close()
        for connection in list(self.connections):
            connection.shut_down()
        deadline = time.monotonic() + grace_seconds
        while any(c.streams for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
