#!/usr/bin/env python3
"""Fixed-latency TCP proxy for the REST benchmark (ops/bench/rest.sh).

Forwards bytes verbatim between each accepted connection and its own upstream
connection, delivering every chunk DELAY_MS after it was read, in order, in each
direction (like a network link with that one-way delay and no bandwidth limit). It
does not parse HTTP: HTTP/1.1 keep-alive, pipelining and connection closes pass
through as they are (a close or half-close is forwarded after the same delay), so
one client connection is one server connection, as without the proxy.
A request/response round trip gains 2 × DELAY_MS.

Bounded: at most --max-conns connections at once (more are refused by closing
them), and at most --queue chunks of up to 64 KiB waiting per direction (the
reader stops reading when the queue is full, so TCP backpressure reaches the
sender). Stops on its own when --parent exits or after --lifetime seconds.

  latency_proxy.py --delay-ms 10 --map 18001:3001 [--map LPORT:UPORT ...]
                   [--parent PID] [--lifetime 7200] [--max-conns 128] [--queue 16]

Prints "ready" on stdout once every listen port is bound.
"""
import argparse
import asyncio
import os
import sys
import time

CHUNK = 64 * 1024


async def pump(reader, writer, delay, qsize):
    """Copy reader → writer, each chunk delivered `delay` seconds after it was read."""
    queue = asyncio.Queue(maxsize=qsize)

    async def read_side():
        try:
            while True:
                data = await reader.read(CHUNK)
                await queue.put((time.monotonic() + delay, data))
                if not data:  # EOF, forwarded after the delay too
                    return
        except (ConnectionError, OSError):
            await queue.put((time.monotonic() + delay, None))

    async def write_side():
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if data is None:  # reset on the reading side
                writer.transport.abort()
                return
            try:
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):  # the peer is gone: end this direction
                writer.transport.abort()
                return

    r = asyncio.ensure_future(read_side())
    try:
        await write_side()
    finally:
        r.cancel()


class Proxy:
    def __init__(self, args):
        self.delay = args.delay_ms / 1000.0
        self.qsize = args.queue
        self.max_conns = args.max_conns
        self.conns = 0

    def handler(self, upstream_port):
        async def handle(creader, cwriter):
            if self.conns >= self.max_conns:
                print(f"latency_proxy: refusing a connection over --max-conns {self.max_conns}",
                      file=sys.stderr)
                cwriter.transport.abort()
                return
            self.conns += 1
            uwriter = None
            try:
                # Connecting costs one round trip on a real network too.
                await asyncio.sleep(self.delay)
                ureader, uwriter = await asyncio.open_connection("127.0.0.1", upstream_port)
                await asyncio.sleep(self.delay)
                up = asyncio.ensure_future(pump(creader, uwriter, self.delay, self.qsize))
                down = asyncio.ensure_future(pump(ureader, cwriter, self.delay, self.qsize))
                # Both directions finish on their own (EOF each way), or one fails.
                done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
                for t in pending:
                    t.cancel()
                for t in done:
                    t.exception()  # retrieved: a failed direction just ends the connection
            except (ConnectionError, OSError):
                pass
            finally:
                self.conns -= 1
                for w in (cwriter, uwriter):
                    if w is not None:
                        w.close()
        return handle


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay per direction")
    ap.add_argument("--map", action="append", required=True, metavar="LPORT:UPORT")
    ap.add_argument("--parent", type=int, default=os.getppid())
    ap.add_argument("--lifetime", type=float, default=7200.0)
    ap.add_argument("--max-conns", type=int, default=128)
    ap.add_argument("--queue", type=int, default=16, help="chunks waiting per direction")
    args = ap.parse_args()
    proxy = Proxy(args)
    servers = []
    for m in args.map:
        lport, uport = (int(x) for x in m.split(":"))
        servers.append(await asyncio.start_server(proxy.handler(uport), "127.0.0.1", lport,
                                                  backlog=256))
    print("ready", flush=True)
    deadline = time.monotonic() + args.lifetime
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        try:
            os.kill(args.parent, 0)
        except ProcessLookupError:
            break
    for s in servers:
        s.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
