// wsrelay demo page: a chat client of the /ws envelope protocol (docs/protocol.md), plus the
// server's live counters from /stats.json.
//
// The rule that keeps peers from injecting into the page: everything that comes from a peer or
// from the user (payloads, ids, room names, the server's refusal texts) enters the page through
// `textContent` or a DOM attribute, never through an HTML parser. The page's
// Content-Security-Policy backs this up: no inline script runs, and (Trusted Types) assigning a
// string to an HTML sink throws.
//
// What the page keeps, and why:
// - `since`: the newest msg_id of a direct message to us. Direct messages are retained by the
//   server, so reconnecting with `?since=` replays what a dead connection may have swallowed.
//   It is stored per id in localStorage, so a reopened tab also catches up.
// - per room, `since` too: the newest msg_id of the room seen (or the `joined` answer's
//   `last_msg_id`). After a reconnect the room is joined again with it; a server that keeps
//   room history (`--room-history`) replays what the room got meanwhile before its `joined`,
//   and says `recovered: false` when it cannot, which the page shows in the room
//   (docs/protocol.md, "Room history"). Stored per id and room, so a reopened tab catches up
//   on its rooms as well. With it, the room's `epoch` from its last `joined`: the epoch that
//   `since` belongs to (the welcome's epoch is replaced by the next connection's welcome before
//   the rooms are joined again, so it cannot stand for an earlier `since`).
// - `epoch`: the welcome's name for the server's history of our inbox, sent back with `since`.
//   When the server cannot replay everything after `since` (it restarted without its history,
//   or messages outlived its retention), its welcome says `recovered: false` and the page tells
//   the user that messages may be missing (docs/protocol.md, "Recovery").
// - `seen`: msg_ids already shown; a replay repeats messages, and the page drops those.
// - `pending`: sent messages without an ack. After a reconnect they are sent again with the
//   same client id; the server recognises the id and answers with the original ack instead of
//   delivering twice. Client ids start with a random prefix per page load, so a reload cannot
//   reuse an id the server still remembers from the previous one.
'use strict';

(() => {
  const PROTOCOL = 'wsrelay.v1';
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  const STATS_EVERY_MS = 1000;
  const SEEN_MAX = 5000;
  const HISTORY_MAX = 500;
  const PENDING_MAX = 100;

  const $ = (id) => document.getElementById(id);

  // Storage can throw (privacy modes, full quota): the page then simply forgets.
  const store = {
    get(area, key) {
      try { return area.getItem(key); } catch { return null; }
    },
    set(area, key, value) {
      try { area.setItem(key, value); } catch { /* forget */ }
    },
    remove(area, key) {
      try { area.removeItem(key); } catch { /* nothing to forget */ }
    },
  };
  const KEY_ID = 'wsrelay.demo.id';
  // A token is a credential: kept for this tab's session only, not for every later visit.
  const KEY_TOKEN = 'wsrelay.demo.token';
  // The close code of a connection whose token expired (docs/protocol.md, "Close codes"):
  // reconnecting with the same token cannot help, the user needs a new one.
  const TOKEN_EXPIRED = 4001;
  const keySince = (id) => 'wsrelay.demo.since.' + id;
  const keyEpoch = (id) => 'wsrelay.demo.epoch.' + id;
  const keyRooms = (id) => 'wsrelay.demo.rooms.' + id;
  // One key per room (not one object of all rooms: a room may be called `__proto__`); room
  // names have no '/', so id and room cannot run into each other.
  const keyRoomSince = (id, room) => 'wsrelay.demo.roomSince.' + id + '/' + room;
  const keyRoomEpoch = (id, room) => 'wsrelay.demo.roomEpoch.' + id + '/' + room;

  const state = {
    authRequired: null, // from /stats.json: ask for a token (true) or an id (false)
    credential: null, // { kind: 'id' | 'token', value, id }: id is null if a token hides it
    me: null, // our id, from the welcome
    ws: null,
    welcomed: false,
    wanted: false, // the user wants to be connected: reconnect when the connection drops
    attempt: 0, // failed attempts since the last welcome (the backoff exponent)
    retryTimer: null,
    connectSeq: 0, // tells a connect() that a newer one has started
    since: null, // BigInt
    epoch: null, // the welcome's epoch (16 hex digits), sent back with `since`
    seen: new Set(),
    names: new Map(), // id -> the `name` in its token's `info` claim, when one was shown
    conversations: new Map(), // 'room:lobby' | 'dm:bob' -> conversation
    active: null,
    pending: new Map(), // client id -> { frame, badge }
    echoes: new Map(), // msg_id -> element: our own direct message to ourselves, shown twice
    lastJoin: null, // the conversation of the last join sent (errors name no command)
    clientPrefix: randomHex(4),
    nextClientId: 1,
  };

  function randomHex(bytes) {
    const a = new Uint8Array(bytes);
    crypto.getRandomValues(a);
    return Array.from(a, (b) => b.toString(16).padStart(2, '0')).join('');
  }

  // ----- connection state --------------------------------------------------------------------

  function setState(kind, text) {
    const el = $('state');
    el.dataset.state = kind;
    el.textContent = text;
  }

  function showError(text) {
    const el = $('login-error');
    el.textContent = text;
    el.hidden = false;
  }

  function showLogin() {
    $('login').hidden = false;
    $('chat').hidden = true;
  }

  function showChat() {
    $('login').hidden = true;
    $('login-error').hidden = true;
    $('chat').hidden = false;
  }

  // ----- login -------------------------------------------------------------------------------

  // The token's `sub`, read without verifying (the server verifies): the page needs the id
  // before connecting, to find its stored `since`.
  function tokenSubject(token) {
    try {
      const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      const bytes = Uint8Array.from(atob(part.padEnd(Math.ceil(part.length / 4) * 4, '=')), (c) =>
        c.charCodeAt(0));
      const sub = JSON.parse(new TextDecoder().decode(bytes)).sub;
      return typeof sub === 'string' ? sub : null;
    } catch {
      return null;
    }
  }

  function loadSince(id) {
    const text = id === null ? null : store.get(localStorage, keySince(id));
    try {
      return text === null ? null : BigInt(text);
    } catch {
      return null;
    }
  }

  function loadRoomSince(id, room) {
    const text = store.get(localStorage, keyRoomSince(id, room));
    try {
      return text === null ? null : BigInt(text);
    } catch {
      return null;
    }
  }

  // The rooms this id was in, as conversations to join, each with its stored `since`.
  function restoreRooms(id) {
    for (const room of loadRooms(id)) {
      const conv = conversation('room', room);
      conv.wanted = true;
      conv.since = loadRoomSince(id, room);
      conv.epoch = store.get(localStorage, keyRoomEpoch(id, room));
    }
  }

  function loadRooms(id) {
    try {
      const rooms = JSON.parse(store.get(localStorage, keyRooms(id)) || '[]');
      return Array.isArray(rooms) ? rooms.filter((r) => typeof r === 'string') : [];
    } catch {
      return [];
    }
  }

  function saveRooms() {
    if (state.me === null) return;
    const rooms = [];
    for (const conv of state.conversations.values()) {
      if (conv.kind === 'room' && conv.wanted) rooms.push(conv.name);
    }
    store.set(localStorage, keyRooms(state.me), JSON.stringify(rooms));
  }

  function configureLogin() {
    const token = state.authRequired;
    $('login-id').hidden = token;
    $('login-token').hidden = !token;
    $('id-input').required = !token;
    $('token-input').required = token;
    const remembered = token
      ? store.get(sessionStorage, KEY_TOKEN)
      : store.get(localStorage, KEY_ID);
    if (remembered) {
      $(token ? 'token-input' : 'id-input').value = remembered;
      login(remembered);
    } else {
      $(token ? 'token-input' : 'id-input').focus();
    }
  }

  // Forgets everything about the previous id.
  function reset() {
    for (const conv of [...state.conversations.values()]) removeConversation(conv);
    state.pending.clear();
    state.echoes.clear();
    state.seen.clear();
    state.names.clear();
    state.since = null;
    state.epoch = null;
    state.me = null;
  }

  function login(value) {
    reset();
    const kind = state.authRequired ? 'token' : 'id';
    const id = kind === 'token' ? tokenSubject(value) : value;
    state.credential = { kind, value, id };
    state.since = loadSince(id);
    state.epoch = id === null ? null : store.get(localStorage, keyEpoch(id));
    state.wanted = true;
    state.attempt = 0;
    $('login-error').hidden = true;
    if (id !== null) restoreRooms(id);
    connect();
  }

  function logout() {
    state.wanted = false;
    clearTimeout(state.retryTimer);
    const ws = state.ws;
    state.ws = null;
    state.welcomed = false;
    if (ws) ws.close(1000, 'bye');
    store.remove(localStorage, KEY_ID);
    store.remove(sessionStorage, KEY_TOKEN);
    reset();
    setState('idle', 'not connected');
    showLogin();
  }

  // ----- connecting --------------------------------------------------------------------------

  function wsBase() {
    return (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host;
  }

  // A browser's WebSocket never shows the HTTP status of a refused upgrade: a 401 and a dead
  // server look alike (an `error`, then a `close` with code 1006). So the page first asks the
  // same URL with a plain GET. The server checks the id or token before it notices the request
  // is no upgrade: 426 means "all fine, now upgrade"; 400 or 401 come with the reason in the
  // body, and are final (trying again cannot help).
  async function connect() {
    clearTimeout(state.retryTimer);
    const seq = ++state.connectSeq;
    const cred = state.credential;
    if (!state.wanted || cred === null) return;
    const query = (cred.kind === 'token' ? 'token=' : 'id=') + encodeURIComponent(cred.value);
    setState('connecting', state.attempt ? `reconnecting (attempt ${state.attempt + 1})…` : 'connecting…');
    let check;
    try {
      check = await fetch('/ws?' + query, { cache: 'no-store', redirect: 'error' });
    } catch {
      if (seq === state.connectSeq) retry('the server is unreachable');
      return;
    }
    const why = check.status === 426 ? '' : (await check.text().catch(() => '')).trim();
    if (seq !== state.connectSeq || !state.wanted) return;
    if (check.status !== 426) {
      if ([400, 401, 403].includes(check.status)) return refused(check.status, why);
      return retry(`HTTP ${check.status}${why ? ': ' + why : ''}`);
    }
    let since = state.since === null ? '' : '&since=' + state.since.toString();
    if (since !== '' && state.epoch !== null) since += '&epoch=' + encodeURIComponent(state.epoch);
    const ws = new WebSocket(wsBase() + '/ws?' + query + since, PROTOCOL);
    state.ws = ws;
    state.welcomed = false;
    let opened = false;
    ws.addEventListener('open', () => { opened = true; });
    ws.addEventListener('message', (e) => {
      if (state.ws === ws && typeof e.data === 'string') onFrame(e.data);
    });
    ws.addEventListener('close', (e) => {
      if (state.ws !== ws) return;
      state.ws = null;
      state.welcomed = false;
      disconnected();
      if (!state.wanted) return;
      if (!opened) {
        // The check passed, the upgrade did not: the browser adds an Origin header that the
        // check (a same-origin GET) does not carry.
        return retry('the WebSocket was refused (is this page\'s origin allowed by --allow-origin?)');
      }
      if (e.code === TOKEN_EXPIRED) return tokenExpired();
      retry(`connection closed (${e.code}${e.reason ? ': ' + e.reason : ''})`);
    });
  }

  // The server closed the connection because its token expired (4001). The stored token is
  // dead: forget it, say so, and ask for a new one (the page has no issuer to fetch one from;
  // `wsrelay client --token-cmd` shows the automatic way). Rooms and history are kept for the
  // same id, so a new token for it picks up where this one stopped.
  function tokenExpired() {
    state.wanted = false;
    clearTimeout(state.retryTimer);
    store.remove(sessionStorage, KEY_TOKEN);
    setState('refused', 'token expired');
    $('token-input').value = '';
    showError('Your token expired (close 4001). Paste a new token to reconnect.');
    showLogin();
    $('token-input').focus();
  }

  // Exponential backoff with jitter: 0.5 s doubling to 15 s, each wait drawn from its upper
  // half so that many pages dropped at once do not all return at once.
  function retry(reason) {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** Math.min(state.attempt, 16));
    const wait = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    state.attempt += 1;
    setState('waiting', `${reason}; retrying in ${(wait / 1000).toFixed(1)} s`);
    state.retryTimer = setTimeout(connect, wait);
  }

  function refused(status, why) {
    state.wanted = false;
    const what = state.credential.kind === 'token' ? 'token' : 'id';
    setState('refused', `refused (HTTP ${status})`);
    showError(`The server refused this ${what}: ${why || 'HTTP ' + status}`);
    showLogin();
  }

  function disconnected() {
    for (const conv of state.conversations.values()) {
      if (conv.kind !== 'room') continue;
      if (conv.joined) system(conv, 'connection lost');
      conv.joined = false;
      conv.joining = false;
      conv.leaving = false;
      conv.members.clear();
      if (conv === state.active) renderMembers(conv);
    }
    for (const p of state.pending.values()) setAck(p.badge, 'waiting');
  }

  function send(command) {
    if (state.ws !== null && state.welcomed) state.ws.send(JSON.stringify(command));
  }

  // ----- what the server says ----------------------------------------------------------------

  function onFrame(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return;
    }
    if (msg === null || typeof msg !== 'object') return;
    switch (msg.type) {
      case 'welcome': return onWelcome(msg);
      case 'message': return onMessage(msg);
      case 'ack': return onAck(msg);
      case 'presence': return onPresence(msg);
      case 'members': return onMembers(msg);
      case 'error': return onError(msg);
      case 'joined': return onJoined(msg);
      default: return undefined;
    }
  }

  function onWelcome(msg) {
    const again = state.me !== null;
    state.me = msg.id;
    state.welcomed = true;
    state.attempt = 0;
    if (msg.recovered === false) {
      // The server could not replay everything after our `since` (SPEC §13): say so, never
      // pretend the conversation is complete.
      setState('connected', `connected as ${msg.id}: some messages sent while you were away may be missing`);
    } else {
      setState('connected', `connected as ${msg.id}`);
    }
    if (typeof msg.epoch === 'string') {
      state.epoch = msg.epoch;
      store.set(localStorage, keyEpoch(msg.id), msg.epoch);
    }
    const cred = state.credential;
    if (cred.kind === 'token') store.set(sessionStorage, KEY_TOKEN, cred.value);
    else store.set(localStorage, KEY_ID, cred.value);
    if (cred.id === null) {
      // A token whose `sub` the page could not read: now the id is known.
      cred.id = msg.id;
      state.since = loadSince(msg.id);
      restoreRooms(msg.id);
    }
    showChat();
    // Rooms are joined per connection: join again what this page was in.
    for (const conv of state.conversations.values()) {
      if (conv.kind !== 'room' || !conv.wanted) continue;
      if (again) system(conv, 'reconnected: catching up with the room');
      join(conv);
    }
    saveRooms();
    for (const p of state.pending.values()) {
      state.ws.send(p.frame);
      setAck(p.badge, 'sending');
    }
  }

  function onMessage(msg) {
    if (typeof msg.msg_id !== 'string' || state.seen.has(msg.msg_id)) return;
    remember(msg.msg_id);
    const mine = msg.from === state.me;
    let conv;
    if (msg.room !== null && msg.room !== undefined) {
      conv = state.conversations.get('room:' + msg.room);
      if (conv === undefined) return; // a room just left; the message was already on its way
      advanceRoomSince(conv, msg.msg_id);
    } else {
      conv = conversation('dm', mine ? msg.to : msg.from);
      if (msg.to === state.me) advanceSince(msg.msg_id);
    }
    const li = addMessage(conv, msg.from, payloadText(msg.payload), msg.timestamp, mine);
    // Our own message to ourselves also comes back as a message; its ack will tell whether it
    // was sent from this page (and is already shown) or from another device.
    if (mine && msg.to === state.me) state.echoes.set(msg.msg_id, li);
    if (state.active === null) select(conv);
  }

  function onAck(msg) {
    const p = state.pending.get(msg.id);
    if (p === undefined) return;
    state.pending.delete(msg.id);
    setAck(p.badge, msg.status, msg.reason);
    if (typeof msg.msg_id === 'string') {
      remember(msg.msg_id);
      const echo = state.echoes.get(msg.msg_id);
      if (echo !== undefined) echo.remove();
      state.echoes.delete(msg.msg_id);
    }
  }

  // The answer to every join, after the replay a `since` asked for: from here the room is live.
  function onJoined(msg) {
    const conv = state.conversations.get('room:' + msg.room);
    if (conv === undefined) return;
    // Before any message of the room arrives, the newest one the server keeps is where a
    // rejoin's replay starts.
    if (conv.since === null && typeof msg.last_msg_id === 'string') {
      advanceRoomSince(conv, msg.last_msg_id);
    }
    // The epoch the room's msg_ids belong to, sent with the next rejoin's `since`.
    if (typeof msg.epoch === 'string') {
      conv.epoch = msg.epoch;
      if (state.me !== null) store.set(localStorage, keyRoomEpoch(state.me, conv.name), msg.epoch);
    }
    if (msg.recovered === false) {
      // SPEC §13: never a silent partial recovery.
      system(conv, 'some messages sent to this room while you were away may be missing');
    }
  }

  // The answer to our `members` request: who is in the room now, one entry per connection.
  // It replaces the list; presence events after it apply on top.
  function onMembers(msg) {
    const conv = state.conversations.get('room:' + msg.room);
    if (conv === undefined || !conv.joined || !Array.isArray(msg.ids)) return;
    conv.members = new Map();
    for (const id of msg.ids) {
      if (typeof id === 'string') conv.members.set(id, (conv.members.get(id) || 0) + 1);
    }
    if (Array.isArray(msg.members)) {
      for (const m of msg.members) if (m !== null && typeof m === 'object') rememberName(m.id, m.info);
    }
    if (conv === state.active) renderMembers(conv);
  }

  // A token's `info` claim comes with presence and `members` (docs/protocol.md, "Access"); the
  // page shows its `name`, if it has one, beside the id. Shown as text, like every id.
  function rememberName(id, info) {
    if (typeof id !== 'string' || info === null || typeof info !== 'object') return;
    if (typeof info.name === 'string' && info.name !== '') state.names.set(id, info.name.slice(0, 64));
  }

  function onPresence(msg) {
    const conv = state.conversations.get('room:' + msg.room);
    if (conv === undefined) return;
    const self = msg.id === state.me;
    if (msg.event === 'join') rememberName(msg.id, msg.info);
    if (self && msg.event === 'join' && conv.joining) {
      conv.joining = false;
      conv.joined = true;
      conv.members = new Map([[state.me, 1]]);
      system(conv, 'you joined');
      // Presence only announces changes: ask who was here before us.
      send({ type: 'members', room: msg.room });
      if (state.active === null) select(conv);
    } else if (msg.event === 'join') {
      conv.members.set(msg.id, (conv.members.get(msg.id) || 0) + 1);
      system(conv, `${msg.id} joined`);
    } else if (msg.event === 'leave') {
      // Presence is per connection: an id with two devices here leaves twice.
      const n = conv.members.get(msg.id) || 0;
      if (n > 1) conv.members.set(msg.id, n - 1);
      else conv.members.delete(msg.id);
      system(conv, `${msg.id} left`);
    }
    if (conv === state.active) renderMembers(conv);
  }

  function onError(msg) {
    const text = `the server says: ${msg.code}: ${msg.message}`;
    // An error does not name the command that caused it. The ones a join can cause are pinned
    // on the last join sent.
    const joinErrors = ['forbidden', 'too_many_rooms', 'invalid_room', 'room_too_long'];
    const joinError = joinErrors.includes(msg.code) && state.lastJoin !== null;
    const conv = joinError ? state.lastJoin : state.active;
    if (joinError && conv.joining) {
      conv.joining = false;
      conv.wanted = false;
      saveRooms();
    }
    if (conv !== null && state.conversations.has(conv.key)) system(conv, text);
    else setState('connected', `connected as ${state.me} (${text})`);
  }

  function remember(msgId) {
    state.seen.add(msgId);
    if (state.seen.size > SEEN_MAX) {
      // Sets iterate in insertion order: forget the oldest.
      state.seen.delete(state.seen.values().next().value);
    }
  }

  // msg_ids are decimal strings; compare them as numbers (docs/protocol.md).
  function advanceSince(msgId) {
    let n;
    try {
      n = BigInt(msgId);
    } catch {
      return;
    }
    if (state.since === null || n > state.since) {
      state.since = n;
      store.set(localStorage, keySince(state.me), n.toString());
    }
  }

  function advanceRoomSince(conv, msgId) {
    let n;
    try {
      n = BigInt(msgId);
    } catch {
      return;
    }
    if (conv.since === null || n > conv.since) {
      conv.since = n;
      // Stored like the inbox's `since`, so a reopened tab catches up on its rooms too.
      if (state.me !== null) store.set(localStorage, keyRoomSince(state.me, conv.name), n.toString());
    }
  }

  function payloadText(payload) {
    if (typeof payload === 'string') return payload;
    if (payload !== null && typeof payload === 'object' && typeof payload.text === 'string') {
      return payload.text;
    }
    return JSON.stringify(payload);
  }

  // ----- conversations -----------------------------------------------------------------------

  function conversation(kind, name) {
    const key = kind + ':' + name;
    const existing = state.conversations.get(key);
    if (existing !== undefined) return existing;
    const list = document.createElement('ol');
    list.dataset.key = key;
    list.hidden = true;
    $('messages').append(list);
    const item = document.createElement('li');
    item.dataset.key = key;
    item.tabIndex = 0;
    const label = document.createElement('span');
    label.className = 'name';
    label.textContent = (kind === 'room' ? '# ' : '@ ') + name;
    const unread = document.createElement('span');
    unread.className = 'unread';
    unread.hidden = true;
    item.append(label, unread);
    $('conversations').append(item);
    const conv = {
      key, kind, name, list, item, unreadBadge: unread, unread: 0,
      wanted: false, joined: false, joining: false, leaving: false, members: new Map(),
      since: null, // rooms: the newest msg_id seen (BigInt), sent with the next join
      epoch: null, // rooms: the epoch of the last `joined`, which `since` belongs to
    };
    item.addEventListener('click', () => select(conv));
    item.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' || e.key === ' ') select(conv);
    });
    state.conversations.set(key, conv);
    return conv;
  }

  function removeConversation(conv) {
    conv.list.remove();
    conv.item.remove();
    state.conversations.delete(conv.key);
    if (state.lastJoin === conv) state.lastJoin = null;
    if (state.active === conv) {
      state.active = null;
      const next = state.conversations.values().next();
      if (next.done) renderEmpty();
      else select(next.value);
    }
  }

  function join(conv) {
    conv.joining = true;
    state.lastJoin = conv;
    const command = { type: 'join', room: conv.name };
    if (conv.since !== null) {
      // A room we were in: ask for what it got while we were away (SPEC §16).
      command.since = conv.since.toString();
      // The room's own epoch (from its `joined`), not the welcome's: by now that is the new
      // connection's, which would pass off a since from before a restart as current.
      if (conv.epoch !== null) command.epoch = conv.epoch;
    }
    send(command);
  }

  function select(conv) {
    state.active = conv;
    for (const c of state.conversations.values()) {
      c.list.hidden = c !== conv;
      c.item.setAttribute('aria-current', String(c === conv));
    }
    conv.unread = 0;
    renderUnread(conv);
    $('conv-title').textContent = (conv.kind === 'room' ? '# ' : '@ ') + conv.name;
    const close = $('conv-close');
    close.hidden = false;
    close.textContent = conv.kind === 'room' ? 'Leave room' : 'Close';
    $('members-box').hidden = conv.kind !== 'room';
    $('composer').hidden = false;
    renderMembers(conv);
    const box = $('messages');
    box.scrollTop = box.scrollHeight;
  }

  function renderEmpty() {
    $('conv-title').textContent = 'Join a room or open a direct conversation';
    $('conv-close').hidden = true;
    $('members-box').hidden = true;
    $('composer').hidden = true;
  }

  function renderMembers(conv) {
    if (conv !== state.active || conv.kind !== 'room') return;
    const items = [...conv.members.keys()].sort().map((id) => {
      const li = document.createElement('li');
      const name = state.names.get(id);
      const label = name === undefined ? id : `${id} · ${name}`;
      li.textContent = id === state.me ? `${label} (you)` : label;
      li.dataset.id = id;
      return li;
    });
    $('members').replaceChildren(...items);
  }

  function renderUnread(conv) {
    conv.unreadBadge.textContent = String(conv.unread);
    conv.unreadBadge.hidden = conv.unread === 0;
  }

  function clockText(ms) {
    if (typeof ms !== 'number') return '';
    return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
  }

  function addMessage(conv, from, text, timestamp, mine) {
    const li = document.createElement('li');
    li.className = mine ? 'mine' : 'theirs';
    const meta = document.createElement('span');
    meta.className = 'meta';
    const who = document.createElement('span');
    who.className = 'from';
    who.textContent = from;
    const when = document.createElement('time');
    when.textContent = clockText(timestamp);
    meta.append(who, when);
    const body = document.createElement('span');
    body.className = 'text';
    body.textContent = text;
    li.append(meta, body);
    appendTo(conv, li);
    return li;
  }

  function system(conv, text) {
    const li = document.createElement('li');
    li.className = 'system';
    li.textContent = text;
    appendTo(conv, li);
  }

  function appendTo(conv, li) {
    const box = $('messages');
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    conv.list.append(li);
    while (conv.list.childElementCount > HISTORY_MAX) conv.list.firstElementChild.remove();
    if (conv === state.active) {
      if (atBottom) box.scrollTop = box.scrollHeight;
    } else if (li.className !== 'system') {
      conv.unread += 1;
      renderUnread(conv);
    }
  }

  const ACK_TEXT = {
    waiting: 'waiting for the connection',
    sending: 'sending…',
    delivered: '✓ delivered',
    partial: '⚠ partly delivered',
    queued: '✓ queued: recipient offline',
    rejected: '✗ rejected',
  };

  function setAck(badge, status, reason) {
    badge.dataset.status = status;
    const text = ACK_TEXT[status] || String(status);
    badge.textContent = reason ? `${text}: ${reason}` : text;
  }

  // ----- what the user does ------------------------------------------------------------------

  function sendText(text) {
    const conv = state.active;
    if (conv === null || state.me === null) return;
    if (state.pending.size >= PENDING_MAX) {
      system(conv, `not sent: ${PENDING_MAX} messages are still waiting for their ack`);
      return;
    }
    const id = `${state.clientPrefix}-${state.nextClientId++}`;
    const payload = { text };
    const command = conv.kind === 'room'
      ? { type: 'publish', room: conv.name, payload, id }
      : { type: 'send', to: conv.name, payload, id };
    const li = addMessage(conv, state.me, text, Date.now(), true);
    const badge = document.createElement('span');
    badge.className = 'ack';
    li.querySelector('.meta').append(badge);
    const p = { frame: JSON.stringify(command), badge };
    state.pending.set(id, p);
    if (state.ws !== null && state.welcomed) {
      state.ws.send(p.frame);
      setAck(badge, 'sending');
    } else {
      setAck(badge, 'waiting');
    }
  }

  // docs/protocol.md: ids are 1-128 bytes without control characters.
  function idProblem(id) {
    if (id.length === 0) return 'an id cannot be empty';
    if (new TextEncoder().encode(id).length > 128) return 'an id is at most 128 bytes';
    if (/[\u0000-\u001f\u007f-\u009f]/.test(id)) return 'an id has no control characters';
    return null;
  }

  $('login-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const field = state.authRequired ? 'token-input' : 'id-input';
    const value = $(field).value.trim();
    const problem = state.authRequired ? (value ? null : 'paste a token') : idProblem(value);
    if (problem !== null) return showError(problem);
    login(value);
  });

  $('join-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const name = $('room-input').value.trim();
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(name)) return;
    const conv = conversation('room', name);
    conv.wanted = true;
    saveRooms();
    if (!conv.joined && !conv.joining) join(conv);
    select(conv);
    $('room-input').value = '';
  });

  $('dm-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const id = $('dm-input').value.trim();
    const problem = idProblem(id);
    if (problem !== null) {
      $('dm-input').setCustomValidity(problem);
      $('dm-input').reportValidity();
      return;
    }
    select(conversation('dm', id));
    $('dm-input').value = '';
    $('text-input').focus();
  });
  $('dm-input').addEventListener('input', () => $('dm-input').setCustomValidity(''));

  $('composer').addEventListener('submit', (e) => {
    e.preventDefault();
    const text = $('text-input').value;
    if (text.trim() === '') return;
    sendText(text);
    $('text-input').value = '';
  });

  $('conv-close').addEventListener('click', () => {
    const conv = state.active;
    if (conv === null) return;
    if (conv.kind === 'room') {
      conv.wanted = false;
      if (conv.joined || conv.joining) send({ type: 'leave', room: conv.name });
      if (state.me !== null) {
        store.remove(localStorage, keyRoomSince(state.me, conv.name));
        store.remove(localStorage, keyRoomEpoch(state.me, conv.name));
      }
      removeConversation(conv);
      saveRooms();
    } else {
      removeConversation(conv);
    }
  });

  $('logout').addEventListener('click', logout);

  // ----- live counters -----------------------------------------------------------------------

  let previousStats = null;

  function rate(perSecond) {
    return perSecond >= 100 ? String(Math.round(perSecond)) : perSecond.toFixed(1);
  }

  function uptime(ms) {
    const s = Math.floor(ms / 1000);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function renderStats(s) {
    const put = (id, value) => { $(id).textContent = value; };
    if (s === null) {
      for (const id of ['stat-connections', 'stat-in-rate', 'stat-out-rate', 'stat-messages-in',
        'stat-rooms', 'stat-ids', 'stat-uptime', 'stat-poller']) put(id, '–');
      previousStats = null;
      return;
    }
    // Rates from the difference of two readings over the server's own clock (uptime), so a
    // late poll does not inflate them. A smaller uptime means the server restarted.
    const before = previousStats;
    if (before !== null && s.uptime_ms > before.uptime_ms) {
      const seconds = (s.uptime_ms - before.uptime_ms) / 1000;
      put('stat-in-rate', rate((s.messages_in - before.messages_in) / seconds));
      put('stat-out-rate', rate((s.messages_out - before.messages_out) / seconds));
    } else {
      put('stat-in-rate', '–');
      put('stat-out-rate', '–');
    }
    previousStats = s;
    put('stat-connections', String(s.connections));
    put('stat-messages-in', String(s.messages_in));
    put('stat-rooms', String(s.rooms));
    put('stat-ids', String(s.ids_online));
    put('stat-uptime', uptime(s.uptime_ms));
    put('stat-poller', String(s.poller));
  }

  async function pollStats() {
    let s = null;
    try {
      const r = await fetch('/stats.json', { cache: 'no-store' });
      if (r.ok) s = await r.json();
    } catch {
      s = null;
    }
    renderStats(s);
    // The first answer says whether to ask for an id or a token. Without one (the server
    // is down), ask for an id: connecting will say what is wrong.
    if (state.authRequired === null) {
      state.authRequired = s !== null && s.auth_required === 1;
      configureLogin();
    }
    setTimeout(pollStats, STATS_EVERY_MS);
  }

  pollStats();
})();
