"""wsrelay driven by an independent peer: Python's `websockets` client.

Starts the server binary given on the command line (once per poller), then checks echo of text
and binary messages, fragmented messages, ping/pong, and the close handshake both ways.
Every wait is bounded by a timeout; nothing sleeps to synchronise.
"""

import argparse
import asyncio
import select
import subprocess
import sys

import websockets
from websockets.exceptions import ConnectionClosed

TIMEOUT = 10


async def check_echo(url):
    async with websockets.connect(url, max_size=None, open_timeout=TIMEOUT) as ws:
        for size in (0, 1, 125, 126, 65535, 65536, 1 << 20):
            text = "".join(chr(ord("a") + i % 26) for i in range(size))
            await ws.send(text)
            got = await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert got == text, f"text of {size} bytes"
            data = bytes(i * 7 % 256 for i in range(size))
            await ws.send(data)
            got = await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert got == data, f"binary of {size} bytes"

        # A fragmented message: websockets sends an iterable as fragments.
        await ws.send(["frag", "mented ", "κόσμε"])
        got = await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert got == "fragmented κόσμε", got

        # Ping: websockets resolves the waiter when the matching pong arrives.
        pong = await ws.ping(b"payload")
        await asyncio.wait_for(pong, TIMEOUT)


async def check_client_close(url):
    ws = await websockets.connect(url, open_timeout=TIMEOUT)
    await ws.close(code=4000, reason="done")
    assert ws.close_code == 4000, ws.close_code  # the server echoed our code


async def check_server_close(url):
    # Too big for --max-message: the server closes with 1009.
    async with websockets.connect(url, max_size=None, open_timeout=TIMEOUT) as ws:
        await ws.send(b"x" * (2 << 20))
        try:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
            raise AssertionError("expected the server to close")
        except ConnectionClosed as e:
            assert e.rcvd is not None and e.rcvd.code == 1009, e


async def main_async(url):
    await check_echo(url)
    await check_client_close(url)
    await check_server_close(url)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--poller", default="epoll")
    args = parser.parse_args()
    server = subprocess.Popen(
        [args.binary, "serve", "--listen", "127.0.0.1:0", "--poller", args.poller],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # The first line names the address; wait for it with a deadline, like every other wait.
        ready, _, _ = select.select([server.stdout], [], [], TIMEOUT)
        if not ready:
            raise AssertionError("the server did not announce its address")
        line = server.stdout.readline()
        addr = line.split()[3]
        asyncio.run(main_async(f"ws://{addr}/echo"))
        print(f"python websockets peer: all checks passed ({args.poller})")
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
