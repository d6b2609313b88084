"""A TCP proxy in front of the broker that can cut the network for a while (chaos suite).

Why a proxy: a broker crash (the harness SIGKILLs and restarts the JVM too) gives clients a quick
"connection refused"; a network partition does not. The broker advertises the proxy's port,
every client (workers, dispatchers, producers, the observer) connects through it, and an outage
is the proxy cutting every open connection and *blackholing* new ones: they are accepted but
never answered, so clients hit their timeouts. When the outage ends the held connections are
closed and clients reconnect.

Runs as its own process (so the test's threads cannot stall it on the GIL):
``python -m tests.chaos.proxy --listen PORT --upstream PORT``; SIGUSR1 starts an outage, SIGUSR2
ends it, SIGTERM stops the proxy. It prints ``listening``, ``paused`` and ``resumed`` lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

CHUNK = 256 * 1024


class Proxy:
    """Forwards 127.0.0.1:``listen`` to 127.0.0.1:``upstream``; see the module docstring."""

    def __init__(self, listen: int, upstream: int) -> None:
        self.listen = listen
        self.upstream = upstream
        self.paused = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self.connections = 0

    async def serve(self, stop: asyncio.Event) -> None:
        server = await asyncio.start_server(self._client, "127.0.0.1", self.listen, backlog=512)
        print("listening", flush=True)
        async with server:
            await stop.wait()
        self._close_all(self._writers | self._held)

    def pause(self) -> None:
        self.paused = True
        self._close_all(set(self._writers))
        print("paused", flush=True)

    def resume(self) -> None:
        self.paused = False
        self._close_all(set(self._held))
        print("resumed", flush=True)

    @staticmethod
    def _close_all(writers: set[asyncio.StreamWriter]) -> None:
        for w in writers:
            transport = w.transport
            if transport is not None and not transport.is_closing():
                transport.abort()  # RST, like a dropped link; no graceful FIN handshake

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.paused:
            self._held.add(writer)  # accepted, never answered, closed when the outage ends
            try:
                await reader.read()  # returns when either side closes
            except (ConnectionError, OSError):
                pass
            finally:
                self._held.discard(writer)
                writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, up_writer}
        self._writers |= pair
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, pair), self._pipe(up_reader, writer, pair)
            )
        finally:
            self._writers -= pair

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: set[asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            Proxy._close_all(pair)  # one side gone: the other goes too


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", type=int, required=True)
    args = parser.parse_args(argv)
    proxy = Proxy(args.listen, args.upstream)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, proxy.pause)
        loop.add_signal_handler(signal.SIGUSR2, proxy.resume)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        await proxy.serve(stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
