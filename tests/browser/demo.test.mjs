// The demo page (SPEC §8) in headless Chromium, driven by playwright-core, against the
// real release binary (`cargo build --release` first; scripts/test does).
//
// Every wait is Playwright's auto-waiting or `waitFor`/`waitForFunction` under a deadline; no
// test sleeps. The run also writes target/browser/demo.png, a screenshot of the two tabs; the
// test run never writes into docs/ (scripts/refresh-screenshot copies the picture there).
//
// The last suite serves the page over https:// and wss:// (SPEC §18) with a certificate made by
// the `openssl` command, which a second Chromium trusts through its SPKI hash.
//
// Environment: WSRELAY_BIN (default target/release/wsrelay), WSRELAY_CHROMIUM (default
// /usr/bin/chromium), TEST_RUST_LOG (the server's RUST_LOG, default wsrelay=warn).

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createHmac } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = process.env.WSRELAY_BIN ?? path.join(root, 'target/release/wsrelay');
const CHROMIUM = process.env.WSRELAY_CHROMIUM ?? '/usr/bin/chromium';
const SCREENSHOT = path.join(root, 'target/browser/demo.png');
// How long any single wait may take before the test fails instead of hanging.
const DEADLINE_MS = 10_000;
const XSS = '<img src=x onerror=alert(1)>';
const XSS_ID = '<img src=x onerror=alert(2)>';

const servers = [];

// Starts `wsrelay serve` on a free loopback port; its first stdout line names the address.
async function startServer(args = []) {
  const child = spawn(BIN, ['serve', '--listen', '127.0.0.1:0', ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
    env: { ...process.env, RUST_LOG: process.env.TEST_RUST_LOG ?? 'wsrelay=warn' },
  });
  servers.push(child);
  const lines = createInterface({ input: child.stdout });
  const first = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the server did not announce its address')), DEADLINE_MS);
    lines.once('line', (line) => { clearTimeout(timer); resolve(line); });
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`wsrelay exited (${code})`)); });
    child.once('error', (e) => { clearTimeout(timer); reject(e); });
  });
  lines.on('line', () => {}); // keep draining, so the server never blocks on a full pipe
  const addr = first.split(/\s+/)[3]; // "wsrelay listening on 127.0.0.1:PORT (poller: ...)"
  return `http://${addr}/`;
}

// An HS256 JWT, made the way any issuer would (RFC 7519), independently of the server's code.
function jwt(claims, secret) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const unsigned = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${unsigned}.${createHmac('sha256', secret).update(unsigned).digest('base64url')}`;
}

let browser;

before(async () => {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  for (const child of servers) {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      await once(child, 'exit');
    }
  }
});

// A page with its dialogs, uncaught errors and policy violations recorded, for assertions.
async function newPage(context, url) {
  const page = await context.newPage();
  page.setDefaultTimeout(DEADLINE_MS);
  page.dialogs = [];
  page.problems = [];
  page.on('dialog', (d) => { page.dialogs.push(d.message()); d.dismiss().catch(() => {}); });
  page.on('pageerror', (e) => page.problems.push(`uncaught: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content Security Policy|Trusted Type/i.test(m.text())) {
      page.problems.push(m.text());
    }
  });
  await page.goto(url);
  return page;
}

async function login(page, id) {
  await page.fill('#id-input', id);
  await page.click('#connect');
  await connected(page, id);
}

async function connected(page, id) {
  await page.locator('#state[data-state="connected"]', { hasText: `connected as ${id}` }).waitFor();
}

async function joinRoom(page, room) {
  await page.fill('#room-input', room);
  await page.click('#join');
  await page.locator('#members li[data-id]', { hasText: '(you)' }).waitFor();
}

async function openDirect(page, id) {
  await page.fill('#dm-input', id);
  await page.click('#open-dm');
}

async function select(page, key) {
  await page.locator(`#conversations li[data-key="${key}"]`).click();
}

// Sends a message in the open conversation; returns the ack badge of that message.
async function say(page, text) {
  await page.fill('#text-input', text);
  await page.click('#send');
  return page.locator('#messages ol:not([hidden]) li.mine', { hasText: text }).last().locator('.ack');
}

// Waits until the ack badge shows one of `statuses`.
async function acked(badge, ...statuses) {
  const wanted = statuses.map((s) => `.ack[data-status="${s}"]`).join(', ');
  await badge.and(badge.page().locator(wanted)).waitFor({ state: 'attached' });
}

// The ack badge of our own message whose text is exactly `text`.
function ackOf(page, text) {
  const body = page.locator('.text', { hasText: new RegExp(`^${text}$`) });
  return page.locator('#messages li.mine').filter({ has: body }).locator('.ack');
}

// The messages of a conversation from others, as text; waits for `text` among them.
async function sees(page, key, text) {
  const item = page.locator(`#messages ol[data-key="${key}"] li.theirs .text`, { hasText: text });
  await item.first().waitFor({ state: 'attached' });
  return item;
}

function clean(page) {
  assert.deepEqual(page.dialogs, [], 'no dialog may open');
  assert.deepEqual(page.problems, [], 'no uncaught error or policy violation');
}

async function stat(page, id) {
  return Number(await page.locator(id).textContent());
}

async function screenshotSideBySide(left, right) {
  const shots = [await left.screenshot({ fullPage: true }), await right.screenshot({ fullPage: true })];
  const width = left.viewportSize().width + right.viewportSize().width + 3 * 16;
  const canvas = await browser.newPage({ viewport: { width, height: 400 } });
  const imgs = shots.map((s) => `<img alt="" src="data:image/png;base64,${s.toString('base64')}">`);
  await canvas.setContent(
    '<body style="margin:0;padding:16px;display:flex;gap:16px;align-items:flex-start;background:#c9ced8">'
      + `${imgs.join('')}</body>`,
  );
  mkdirSync(path.dirname(SCREENSHOT), { recursive: true });
  await canvas.screenshot({ path: SCREENSHOT, fullPage: true });
  await canvas.close();
}

describe('the demo page', () => {
  let url;
  let alice;
  let bob;
  let bobContext;

  before(async () => {
    url = await startServer();
    // Two browser contexts: two profiles, so each page has its own localStorage.
    alice = await newPage(await browser.newContext({ viewport: { width: 860, height: 700 } }), url);
    bobContext = await browser.newContext({ viewport: { width: 390, height: 700 } }); // phone width
    bob = await newPage(bobContext, url);
  });

  test('GET / is one page with its headers and a strict policy', async () => {
    const cases = [
      ['', 'text/html; charset=utf-8'],
      ['demo.js', 'text/javascript; charset=utf-8'],
      ['demo.css', 'text/css; charset=utf-8'],
    ];
    for (const [file, type] of cases) {
      const r = await fetch(url + file);
      const body = await r.arrayBuffer();
      assert.equal(r.status, 200, file);
      assert.equal(r.headers.get('content-type'), type, file);
      assert.equal(Number(r.headers.get('content-length')), body.byteLength, file);
      assert.equal(r.headers.get('cache-control'), 'no-cache', file);
      assert.match(r.headers.get('content-security-policy'), /script-src 'self';/, file);
    }
    // The policy is in force: an HTML sink refuses a string (Trusted Types), so markup can only
    // enter the page through code that asks for it, and the page has none.
    const page = await newPage(await browser.newContext(), url);
    const sink = await page.evaluate(() => {
      try {
        document.createElement('div').innerHTML = '<b>x</b>';
        return 'assigned';
      } catch (e) {
        return e.name;
      }
    });
    assert.equal(sink, 'TypeError');
    await page.context().close();
  });

  test('Chromium negotiates permessage-deflate and compressed messages go both ways', async () => {
    const before = await (await fetch(url + 'metrics')).text();
    const count = (text, name) => {
      const line = text.split('\n').find((l) => l.startsWith(`${name} `));
      assert.ok(line, `${name} missing from /metrics`);
      return Number(line.split(' ')[1]);
    };
    // The browser's own WebSocket, from the page (same origin, within its policy).
    const result = await alice.evaluate(async (deadline) => {
      const ws = new WebSocket(location.origin.replace(/^http/, 'ws') + '/echo');
      const message = JSON.stringify(Array.from({ length: 20 }, (_, i) => ({ from: 'alice', text: `hi ${i}` })));
      const echoed = await new Promise((resolve, reject) => {
        setTimeout(() => reject(new Error('no echo')), deadline);
        ws.onopen = () => ws.send(message);
        ws.onmessage = (e) => resolve(e.data);
        ws.onerror = () => reject(new Error('websocket error'));
      });
      ws.close();
      return { extensions: ws.extensions, intact: echoed === message };
    }, DEADLINE_MS);
    assert.equal(result.extensions,
      'permessage-deflate; server_no_context_takeover; client_no_context_takeover');
    assert.ok(result.intact, 'the echo is the message');
    const after = await (await fetch(url + 'metrics')).text();
    for (const name of ['wsrelay_compressed_messages_in_total', 'wsrelay_compressed_messages_out_total']) {
      assert.ok(count(after, name) > count(before, name), `${name} moved`);
    }
    clean(alice);
  });

  test('two pages join a room and talk both ways; presence fills the member lists', async () => {
    await login(alice, 'alice');
    await login(bob, 'bob');
    await joinRoom(alice, 'lobby');
    await joinRoom(bob, 'lobby');
    // Alice was there first: she hears bob arrive. Bob asks who was there before him (the
    // `members` command), so his list shows alice too.
    await alice.locator('#members li[data-id="bob"]').waitFor();
    await bob.locator('#members li[data-id="alice"]').waitFor();

    const hello = await say(alice, 'hello from alice');
    await acked(hello, 'delivered');
    await sees(bob, 'room:lobby', 'hello from alice');
    const reply = await say(bob, 'hi alice, bob here');
    await acked(reply, 'delivered');
    await sees(alice, 'room:lobby', 'hi alice, bob here');
    // Phone width: everything fits across, nothing scrolls sideways.
    assert.ok(await bob.evaluate(() => document.documentElement.scrollWidth) <= 390);
    clean(alice);
    clean(bob);
  });

  test('a direct message from A to B', async () => {
    await openDirect(alice, 'bob');
    await acked(await say(alice, 'psst, bob: a direct one'), 'delivered');
    // Bob's page lists the new conversation with an unread count, and opens it on a click.
    await bob.locator('#conversations li[data-key="dm:alice"] .unread', { hasText: '1' }).waitFor();
    await select(bob, 'dm:alice');
    await (await sees(bob, 'dm:alice', 'psst, bob: a direct one')).first().waitFor();
    await acked(await say(bob, 'got it'), 'delivered');
    await sees(alice, 'dm:bob', 'got it');
  });

  test('markup in a payload or an id is shown as text, never run', async () => {
    await select(alice, 'room:lobby');
    await select(bob, 'room:lobby');
    await acked(await say(alice, XSS), 'delivered');
    const shown = await sees(bob, 'room:lobby', XSS);
    assert.equal(await shown.first().textContent(), XSS);
    assert.equal(await bob.locator('#messages img').count(), 0);

    await openDirect(alice, XSS_ID);
    await acked(await say(alice, 'anyone there?'), 'queued');
    assert.equal(await alice.locator('#conv-title').textContent(), `@ ${XSS_ID}`);
    assert.equal(await alice.locator('#conversations img, #messages img').count(), 0);
    await select(alice, 'room:lobby');
    clean(alice);
    clean(bob);
    await screenshotSideBySide(alice, bob);
  });

  test('the counters move', async () => {
    await alice.waitForFunction(() => Number(document.querySelector('#stat-connections').textContent) >= 2);
    await alice.waitForFunction(() => Number(document.querySelector('#stat-rooms').textContent) >= 1);
    const before = await stat(alice, '#stat-messages-in');
    await acked(await say(alice, 'counting'), 'delivered');
    await alice.waitForFunction(
      (n) => Number(document.querySelector('#stat-messages-in').textContent) > n, before);
    await alice.waitForFunction(() => /^[0-9.]+$/.test(document.querySelector('#stat-in-rate').textContent));
  });

  test('B closes; a direct message waits for B (queued); B reopens and gets it', async () => {
    await bob.close();
    // The server has seen bob go once alice hears him leave: only then is "queued" certain.
    await alice.locator('#members li[data-id="bob"]').waitFor({ state: 'detached' });
    await openDirect(alice, 'bob');
    await acked(await say(alice, 'while you were away'), 'queued');

    // Same profile: the page remembers the id and the rooms, and connects by itself.
    const sockets = [];
    bobContext.on('page', (page) => page.on('websocket', (ws) => sockets.push(ws.url())));
    bob = await newPage(bobContext, url);
    await connected(bob, 'bob');
    await alice.locator('#conversations li[data-key="room:lobby"]').click();
    await alice.locator('#members li[data-id="bob"]').waitFor();
    await select(bob, 'dm:alice');
    await sees(bob, 'dm:alice', 'while you were away');
    // Bob reconnected with `since` = the newest direct message he had seen (and the epoch of
    // the server's history it belongs to), so what he had already read is not replayed.
    assert.equal(await bob.locator('#messages li', { hasText: 'psst, bob' }).count(), 0);
    assert.equal(sockets.length, 1);
    assert.match(sockets[0], /\/ws\?id=bob&since=[0-9]+&epoch=[0-9a-f]{16}$/);
    clean(alice);
    clean(bob);
  });
});

describe('the demo page with --jwt-secret', () => {
  const secret = 's3cret';
  const now = Math.floor(Date.now() / 1000);
  let url;

  before(async () => {
    url = await startServer(['--jwt-secret', secret]);
  });

  test('asks for a token, says why one is refused, accepts a good one', async () => {
    const page = await newPage(await browser.newContext(), url);
    await page.locator('#token-input').waitFor();
    assert.equal(await page.locator('#id-input').isVisible(), false);
    // (name, token, what the page must say)
    const refusals = [
      ['not a token', 'not-a-token', 'malformed'],
      ['wrong secret', jwt({ sub: 'carol', exp: now + 3600 }, 'guess'), 'bad_signature'],
      ['expired', jwt({ sub: 'carol', exp: now - 3600 }, secret), 'expired'],
    ];
    for (const [name, token, reason] of refusals) {
      await page.fill('#token-input', token);
      await page.click('#connect');
      const error = page.locator('#login-error', { hasText: 'The server refused this token' });
      await error.filter({ hasText: reason }).waitFor();
      assert.equal(await page.locator('#state').getAttribute('data-state'), 'refused', name);
    }
    await page.fill('#token-input', jwt({ sub: 'carol', exp: now + 3600 }, secret));
    await page.click('#connect');
    await connected(page, 'carol');
    assert.equal(await page.locator('#login-error').isVisible(), false);
    await joinRoom(page, 'lobby');
    clean(page);
  });
});

describe('the demo page when its token expires', () => {
  const secret = 's3cret';
  let url;

  before(async () => {
    // No leeway: the connection is closed (4001) the moment the token's exp passes.
    url = await startServer(['--jwt-secret', secret, '--jwt-leeway', '0s']);
  });

  test('says the token expired, asks for a new one, and reconnects with it', async () => {
    const page = await newPage(await browser.newContext(), url);
    await page.locator('#token-input').waitFor();
    const soon = Date.now() / 1000 + 3;
    await page.fill('#token-input', jwt({ sub: 'dora', exp: soon, info: { name: 'Dora D.' } }, secret));
    await page.click('#connect');
    await connected(page, 'dora');
    // The token's info comes back in presence: the member list shows the name.
    await joinRoom(page, 'lobby');
    await page.locator('#members li[data-id="dora"]', { hasText: 'dora · Dora D. (you)' }).waitFor();
    await page.locator('#login-error', { hasText: 'Your token expired (close 4001)' }).waitFor();
    assert.equal(await page.locator('#state').getAttribute('data-state'), 'refused');
    assert.equal(await page.locator('#token-input').inputValue(), '', 'the dead token is gone');
    const later = Math.floor(Date.now() / 1000) + 3600;
    await page.fill('#token-input', jwt({ sub: 'dora', exp: later }, secret));
    await page.click('#connect');
    await connected(page, 'dora');
    clean(page);
  });
});

describe('the demo page when the connection drops', () => {
  let url;

  before(async () => {
    // A tight rate limit is the server's own way to close a connection (1008) on demand.
    url = await startServer(['--rate', '1', '--burst', '6']);
  });

  test('reconnects with backoff, rejoins, resends what was not acked, misses no direct message', async () => {
    const dave = await newPage(await browser.newContext(), url);
    const erin = await newPage(await browser.newContext(), url);
    // The page's WebSockets as Playwright sees them: the second one is the reconnection.
    const sockets = [];
    const reconnected = new Promise((resolve) => {
      erin.on('websocket', (ws) => { sockets.push(ws); if (sockets.length === 2) resolve(ws); });
    });
    await login(dave, 'dave');
    await login(erin, 'erin');
    await joinRoom(dave, 'lobby');
    await joinRoom(erin, 'lobby');

    // Erin talks faster than the limit until the server closes her connection.
    const sent = [];
    for (let i = 1; i <= 20; i += 1) {
      await say(erin, `burst ${i}`);
      sent.push(`burst ${i}`);
      if (await erin.locator('#state[data-state="connected"]').count() === 0) break;
    }
    await erin.locator('#messages li.system', { hasText: 'connection lost' }).waitFor();
    await openDirect(dave, 'erin');
    const dm = await say(dave, 'did you get this?');

    await reconnected;
    await connected(erin, 'erin');
    await erin.locator('#messages li.system', { hasText: 'reconnected' }).waitFor();
    await erin.locator('#members li[data-id]', { hasText: '(you)' }).waitFor();
    // Live or from the offline queue, depending on whether the server had seen erin go.
    await acked(dm, 'delivered', 'queued');
    await select(erin, 'dm:dave');
    await sees(erin, 'dm:dave', 'did you get this?');
    // Every message erin typed is acked in the end, and dave saw each exactly once.
    for (const text of sent) {
      await acked(ackOf(erin, text), 'delivered');
      assert.equal(await (await sees(dave, 'room:lobby', new RegExp(`^${text}$`))).count(), 1, text);
    }
    assert.equal(sockets.length, 2);
    clean(dave);
    clean(erin);
  });
});

// A CA and a server certificate for localhost (P-256), made with the openssl command in `dir`;
// `spki` is the base64 SHA-256 of the server key's SubjectPublicKeyInfo, what Chromium's
// --ignore-certificate-errors-spki-list trusts.
function makeCertificate(dir) {
  const openssl = (...args) => execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  openssl('req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=wsrelay browser CA');
  openssl('req', ...ec, '-keyout', 'key.pem', '-out', 'server.csr', '-subj', '/CN=localhost');
  writeFileSync(path.join(dir, 'ext.cnf'), 'subjectAltName=DNS:localhost,IP:127.0.0.1\n');
  openssl('x509', '-req', '-in', 'server.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial',
    '-out', 'cert.pem', '-days', '2', '-extfile', 'ext.cnf');
  const spkiDer = openssl('pkey', '-in', 'key.pem', '-pubout', '-outform', 'DER');
  const spki = execFileSync('openssl', ['dgst', '-sha256', '-binary'], { input: spkiDer }).toString('base64');
  return { cert: path.join(dir, 'cert.pem'), key: path.join(dir, 'key.pem'), spki };
}

describe('the demo page over https:// and wss://', () => {
  let dir;
  let url;
  let tlsBrowser;

  before(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'wsrelay-browser-tls-'));
    const { cert, key, spki } = makeCertificate(dir);
    const plain = await startServer(['--tls-cert', cert, '--tls-key', key]);
    url = plain.replace('http://127.0.0.1', 'https://localhost');
    tlsBrowser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
        '--disable-quic', '--no-first-run', '--disable-component-update', '--disable-sync',
        `--ignore-certificate-errors-spki-list=${spki}`],
    });
  });

  after(async () => {
    await tlsBrowser?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test('a browser that does not trust the certificate refuses the page', async () => {
    const page = await (await browser.newContext()).newPage();
    await assert.rejects(page.goto(url, { timeout: DEADLINE_MS }), /ERR_CERT/);
  });

  test('two tabs talk over wss://, in a room and directly', async () => {
    const alice = await newPage(await tlsBrowser.newContext(), url);
    const bob = await newPage(await tlsBrowser.newContext(), url);
    assert.equal(await alice.evaluate(() => location.protocol), 'https:');
    const sockets = [];
    bob.on('websocket', (ws) => sockets.push(ws.url()));
    await login(alice, 'alice');
    await login(bob, 'bob');
    assert.ok(sockets.length >= 1 && sockets.every((u) => u.startsWith('wss://')), sockets.join(' '));
    await joinRoom(alice, 'lobby');
    await joinRoom(bob, 'lobby');
    await alice.locator('#members li[data-id="bob"]').waitFor();
    await acked(await say(alice, 'hello over tls'), 'delivered');
    await sees(bob, 'room:lobby', 'hello over tls');
    await openDirect(alice, 'bob');
    await acked(await say(alice, 'a direct one over tls'), 'delivered');
    await select(bob, 'dm:alice');
    await sees(bob, 'dm:alice', 'a direct one over tls');
    // The live counters come over https:// too.
    await alice.waitForFunction(() => Number(document.querySelector('#stat-connections')?.textContent) >= 2);
    clean(alice);
    clean(bob);
  });
});

describe('the demo page with room history', () => {
  let url;

  before(async () => {
    // The rate limit closes a connection on demand (as above); the room keeps its last 50.
    url = await startServer(['--rate', '1', '--burst', '6', '--room-history', '50']);
  });

  test('rejoins a room with since and shows what the room got while it was away, once', async () => {
    const dave = await newPage(await browser.newContext(), url);
    const erin = await newPage(await browser.newContext(), url);
    // The join commands erin's second connection writes.
    const rejoins = [];
    let sockets = 0;
    erin.on('websocket', (ws) => {
      sockets += 1;
      if (sockets === 2) {
        ws.on('framesent', (f) => { if (String(f.payload).includes('"join"')) rejoins.push(JSON.parse(f.payload)); });
      }
    });
    await login(dave, 'dave');
    await login(erin, 'erin');
    await joinRoom(dave, 'lobby');
    await joinRoom(erin, 'lobby');
    await say(dave, 'before');
    await sees(erin, 'room:lobby', /^before$/);

    for (let i = 1; i <= 20; i += 1) {
      await say(erin, `burst ${i}`);
      if (await erin.locator('#state[data-state="connected"]').count() === 0) break;
    }
    await erin.locator('#messages li.system', { hasText: 'connection lost' }).waitFor();
    await acked(await say(dave, 'while you were away'), 'delivered');

    await connected(erin, 'erin');
    await erin.locator('#members li[data-id]', { hasText: '(you)' }).waitFor();
    const away = await sees(erin, 'room:lobby', /^while you were away$/);
    assert.equal(await away.count(), 1, 'shown once');
    assert.equal(await (await sees(erin, 'room:lobby', /^before$/)).count(), 1, 'not replayed twice');
    assert.equal(rejoins.length, 1, JSON.stringify(rejoins));
    assert.equal(rejoins[0].room, 'lobby');
    assert.match(rejoins[0].since, /^[0-9]+$/);
    assert.match(rejoins[0].epoch, /^[0-9a-f]{16}$/);
    assert.equal(await erin.locator('#messages li.system', { hasText: 'may be missing' }).count(), 0);
    clean(erin);

    // Erin closes the tab; the room goes on; a reopened tab (same profile) catches up too.
    const context = erin.context();
    await erin.close();
    await dave.locator('#members li[data-id="erin"]').waitFor({ state: 'detached' });
    await acked(await say(dave, 'while the tab was closed'), 'delivered');
    const again = await newPage(context, url);
    await connected(again, 'erin');
    await select(again, 'room:lobby');
    await sees(again, 'room:lobby', /^while the tab was closed$/);
    // Only what came after the newest message it had shown is replayed.
    assert.equal(await again.locator('#messages li', { hasText: 'while you were away' }).count(), 0);
    clean(dave);
    clean(again);
  });
});
