// permessage-deflate (RFC 7692, SPEC §17) with Node's `ws`, an independent implementation
// (its perMessageDeflate, zlib underneath), against the real release binary: the extension is
// negotiated, messages are compressed both ways and echoed intact, in shared and dedicated mode,
// in a room, and with a smaller server window.
//
// Every wait is bounded by DEADLINE_MS; nothing sleeps. Environment: WSRELAY_BIN (default
// target/release/wsrelay).

import { describe, test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import WebSocket from 'ws';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = process.env.WSRELAY_BIN ?? path.join(root, 'target/release/wsrelay');
const DEADLINE_MS = 10_000;
const servers = [];

async function startServer(args = []) {
  const child = spawn(BIN, ['serve', '--listen', '127.0.0.1:0', ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, RUST_LOG: 'wsrelay=error' },
  });
  servers.push(child);
  const lines = createInterface({ input: child.stdout });
  const first = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the server did not announce its address')), DEADLINE_MS);
    lines.once('line', (line) => { clearTimeout(timer); resolve(line); });
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`wsrelay exited (${code})`)); });
  });
  lines.on('line', () => {});
  return first.split(/\s+/)[3];
}

after(async () => {
  for (const child of servers) {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      await once(child, 'exit');
    }
  }
});

// A counter from /metrics; a missing one fails the test instead of reading as 0.
async function metric(addr, name) {
  const text = await (await fetch(`http://${addr}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  assert.ok(line, `${name} missing from /metrics`);
  return Number(line.split(' ')[1]);
}

function within(promise, what) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${DEADLINE_MS} ms`)), DEADLINE_MS);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

// Opens a connection; `ws.answered` is the 101's Sec-WebSocket-Extensions, as the server wrote
// it (`ws.extensions` only names the extensions).
async function connect(url, perMessageDeflate) {
  const ws = new WebSocket(url, { perMessageDeflate });
  ws.once('upgrade', (response) => { ws.answered = response.headers['sec-websocket-extensions']; });
  await within(once(ws, 'open'), 'open');
  return ws;
}

// A queue of received messages, so that none is missed between two awaits.
function inbox(ws) {
  const queue = [];
  const waiting = [];
  ws.on('message', (data, isBinary) => {
    const m = isBinary ? Buffer.from(data) : data.toString();
    if (waiting.length) waiting.shift()(m); else queue.push(m);
  });
  return () => within(queue.length ? Promise.resolve(queue.shift()) : new Promise((r) => waiting.push(r)), 'message');
}

function chat(i) {
  return JSON.stringify(Array.from({ length: 12 }, (_, k) => (
    { type: 'message', room: 'lobby', from: `user${k % 5}`, text: `hello number ${i}.${k}` })));
}

async function echoes(addr, perMessageDeflate) {
  const ws = await connect(`ws://${addr}/echo`, perMessageDeflate);
  const next = inbox(ws);
  for (let i = 0; i < 50; i++) {
    const m = chat(i);
    ws.send(m);
    assert.equal(await next(), m);
  }
  const binary = Buffer.alloc(4096, 7);
  ws.send(binary);
  assert.deepEqual(await next(), binary);
  assert.equal(ws.extensions, 'permessage-deflate');
  const extensions = ws.answered;
  ws.close(1000);
  await within(once(ws, 'close'), 'close');
  return extensions;
}

describe('Node ws with perMessageDeflate', () => {
  test('shared mode: negotiated, compressed both ways', async () => {
    const addr = await startServer();
    const before = await metric(addr, 'wsrelay_compressed_messages_in_total');
    const extensions = await echoes(addr, { threshold: 0 });
    assert.match(extensions, /^permessage-deflate/);
    assert.match(extensions, /server_no_context_takeover/);
    assert.match(extensions, /client_no_context_takeover/);
    assert.equal(await metric(addr, 'wsrelay_compressed_messages_in_total') - before, 51);
    assert.equal(await metric(addr, 'wsrelay_compressed_messages_out_total'), 51);
    assert.equal(await metric(addr, 'wsrelay_inflate_errors_total'), 0);
  });

  test('dedicated mode: context takeover both ways', async () => {
    const addr = await startServer(['--compression', 'dedicated']);
    const extensions = await echoes(addr, { threshold: 0 });
    // ws offers `client_max_window_bits` and keeps its window: so does the server.
    assert.equal(extensions, 'permessage-deflate');
    assert.equal(await metric(addr, 'wsrelay_compressed_messages_out_total'), 51);
    // Each echo refers back to the ones before: far better than one message alone.
    assert.ok(await metric(addr, 'wsrelay_compression_ratio') > 8);
  });

  test('a smaller server window is honoured', async () => {
    const addr = await startServer(['--compression-window', '10']);
    const extensions = await echoes(addr, { threshold: 0, serverMaxWindowBits: 9 });
    assert.match(extensions, /server_max_window_bits=9/);
  });

  test('a room message reaches every member compressed once', async () => {
    const addr = await startServer();
    const members = await Promise.all(Array.from({ length: 20 }, () => connect(`ws://${addr}/r/node`, { threshold: 0 })));
    const inboxes = members.map(inbox);
    const deadline = Date.now() + DEADLINE_MS;
    while (await metric(addr, 'wsrelay_room_members{kind="raw"}') < 20) {
      assert.ok(Date.now() < deadline, 'members did not all join');
      await new Promise((r) => setImmediate(r));
    }
    for (let i = 0; i < 5; i++) members[0].send(chat(i));
    for (const next of inboxes.slice(1)) {
      for (let i = 0; i < 5; i++) assert.equal(await next(), chat(i));
    }
    assert.equal(await metric(addr, 'wsrelay_compressions_total'), 5);
    assert.equal(await metric(addr, 'wsrelay_compressed_messages_out_total'), 5 * 19);
    for (const ws of members) ws.terminate();
  });
});
