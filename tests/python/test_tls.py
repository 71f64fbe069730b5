"""wsrelay over TLS (SPEC §18) driven by an independent peer: Python's `websockets` client on
Python's `ssl` (OpenSSL), trusting a CA the test makes with the `openssl` command.

Starts the server binary given on the command line with --tls-cert/--tls-key, then checks echo
(text, binary, a message far larger than a TLS record), a room (/r/<room>: the other member
gets it, the sender does not), and the envelope protocol (/ws: welcome, join, publish, send,
acks). Every wait is bounded by a timeout; nothing sleeps to synchronise.
"""

import argparse
import asyncio
import json
import os
import select
import ssl
import subprocess
import sys
import tempfile

import websockets

TIMEOUT = 10


def make_ca(directory):
    """A CA and a server certificate for localhost and 127.0.0.1 (P-256 keys), as PEM files."""

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=wsrelay python CA")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=localhost")
    with open(os.path.join(directory, "ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "ext.cnf")
    return tuple(os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem"))


async def recv(ws):
    return await asyncio.wait_for(ws.recv(), TIMEOUT)


async def recv_json(ws):
    return json.loads(await recv(ws))


async def check_echo(base, ctx):
    async with websockets.connect(f"{base}/echo", ssl=ctx, max_size=None,
                                  open_timeout=TIMEOUT) as ws:
        # The server's certificate is the one it was given, and the handshake agreed http/1.1.
        tls = ws.transport.get_extra_info("ssl_object")
        assert tls.version() in ("TLSv1.3", "TLSv1.2"), tls.version()
        assert tls.selected_alpn_protocol() in (None, "http/1.1")
        for size in (0, 125, 65536, 1 << 20):
            text = "".join(chr(ord("a") + i % 26) for i in range(size))
            await ws.send(text)
            assert await recv(ws) == text, f"text of {size} bytes"
            data = bytes(i * 7 % 256 for i in range(size))
            await ws.send(data)
            assert await recv(ws) == data, f"binary of {size} bytes"
        pong = await ws.ping(b"over tls")
        await asyncio.wait_for(pong, TIMEOUT)
        await ws.close(code=4000, reason="done")
        assert ws.close_code == 4000, ws.close_code


async def check_room(base, ctx):
    url = f"{base}/r/python-tls"
    async with websockets.connect(url, ssl=ctx, open_timeout=TIMEOUT) as a, \
            websockets.connect(url, ssl=ctx, open_timeout=TIMEOUT) as b:
        # b's join is complete once the server answered b's ping (the upgrade happened first).
        await asyncio.wait_for(await b.ping(), TIMEOUT)
        await a.send("hello room")
        assert await recv(b) == "hello room"
        await b.send(b"\x00\x01binary")
        assert await recv(a) == b"\x00\x01binary"
        # The sender never gets its own message: a's next message is b's, not its own.
        await a.send("second")
        assert await recv(b) == "second"


async def check_envelope(base, ctx):
    async with websockets.connect(f"{base}/ws?id=alice", ssl=ctx, open_timeout=TIMEOUT) as alice, \
            websockets.connect(f"{base}/ws?id=bob", ssl=ctx, open_timeout=TIMEOUT) as bob:
        for ws, who in ((alice, "alice"), (bob, "bob")):
            welcome = await recv_json(ws)
            assert welcome["type"] == "welcome" and welcome["id"] == who, welcome
        await alice.send(json.dumps({"type": "join", "room": "lobby"}))
        joined = await recv_json(alice)
        assert joined == {"type": "presence", "room": "lobby", "id": "alice", "event": "join"}, joined
        # Every join is answered with `joined` after the presence event: live from here on.
        assert (await recv_json(alice))["type"] == "joined"
        await bob.send(json.dumps({"type": "join", "room": "lobby"}))
        assert (await recv_json(bob))["id"] == "bob"
        assert (await recv_json(bob))["type"] == "joined"
        assert (await recv_json(alice))["id"] == "bob"

        await alice.send(json.dumps({"type": "publish", "room": "lobby", "payload": "hi", "id": "a1"}))
        message = await recv_json(bob)
        assert message["type"] == "message" and message["from"] == "alice", message
        assert message["room"] == "lobby" and message["payload"] == "hi", message
        ack = await recv_json(alice)
        assert ack["type"] == "ack" and ack["id"] == "a1" and ack["status"] == "delivered", ack

        await bob.send(json.dumps({"type": "send", "to": "alice", "payload": {"x": 1}, "id": "b1"}))
        direct = await recv_json(alice)
        assert direct["from"] == "bob" and direct["to"] == "alice", direct
        assert direct["payload"] == {"x": 1}, direct
        ack = await recv_json(bob)
        assert ack["id"] == "b1" and ack["status"] == "delivered", ack


async def check_untrusted(base):
    """A client that trusts only the system's roots refuses the test certificate."""
    ctx = ssl.create_default_context()
    try:
        async with websockets.connect(f"{base}/echo", ssl=ctx, open_timeout=TIMEOUT):
            raise AssertionError("an untrusted certificate was accepted")
    except ssl.SSLCertVerificationError:
        pass


async def main_async(base, ctx):
    await check_echo(base, ctx)
    await check_room(base, ctx)
    await check_envelope(base, ctx)
    await check_untrusted(base)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--poller", default="epoll")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        ca, cert, key = make_ca(directory)
        server = subprocess.Popen(
            [args.binary, "serve", "--listen", "127.0.0.1:0", "--poller", args.poller,
             "--tls-cert", cert, "--tls-key", key],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            ready, _, _ = select.select([server.stdout], [], [], TIMEOUT)
            if not ready:
                raise AssertionError("the server did not announce its address")
            port = server.stdout.readline().split()[3].rsplit(":", 1)[1]
            ctx = ssl.create_default_context(cafile=ca)
            asyncio.run(main_async(f"wss://localhost:{port}", ctx))
            print(f"python websockets over TLS: all checks passed ({args.poller})")
        finally:
            server.kill()
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
