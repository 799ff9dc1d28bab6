// Unit tests against a fake WebSocket and fake timers: `node --test clients/js/test/`.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { Client, State } from '../index.js';

/** A WebSocket the test drives by hand; every instance is recorded in `sockets`. */
function fakeWebSocketClass(sockets) {
  return class FakeWebSocket {
    constructor(url, protocol) {
      this.url = url;
      this.protocol = protocol;
      this.sent = [];
      this.closed = null;
      sockets.push(this);
    }
    send(text) {
      this.sent.push(JSON.parse(text));
    }
    close(code) {
      this.closed = code;
    }
    // Test side.
    open() {
      this.onopen?.({});
    }
    receive(msg) {
      this.onmessage?.({ data: typeof msg === 'string' ? msg : JSON.stringify(msg) });
    }
    drop(code, reason = '') {
      this.onclose?.({ code, reason, wasClean: code !== 1006 });
    }
  };
}

/** Timers that run only when the test says so. */
function fakeTimers() {
  let next = 1;
  const due = new Map();
  return {
    setTimeout(fn, delay) {
      const id = next++;
      due.set(id, { fn, delay });
      return id;
    },
    clearTimeout(id) {
      due.delete(id);
    },
    /** The delays of the timers waiting now. */
    delays() {
      return [...due.values()].map((t) => t.delay);
    },
    /** Runs every timer waiting now. */
    runAll() {
      const now = [...due.entries()];
      due.clear();
      for (const [, t] of now) t.fn();
    },
  };
}

/** Lets promise callbacks (the token provider, the probe) run. */
const settle = () => new Promise((resolve) => setImmediate(resolve));

function setup(options = {}) {
  const sockets = [];
  const timers = fakeTimers();
  const client = new Client(options.urls ?? ['ws://a/ws', 'ws://b/ws'], {
    token: 'tok',
    WebSocket: fakeWebSocketClass(sockets),
    timers,
    random: () => 1,
    fetch: async () => ({ status: 400 }),
    ...options,
  });
  const events = [];
  for (const e of ['state', 'publication', 'subscribed', 'lost', 'join', 'leave', 'error', 'message']) {
    client.on(e, (d) => events.push([e, d]));
  }
  return { client, sockets, timers, events };
}

const of = (events, name) => events.filter(([e]) => e === name).map(([, d]) => d);
const pub = (topic, o, d = o, e = 'E1') => ({ type: 'pub', topic, o, e, d });
const subscribed = (topic, o, extra = {}) => ({
  type: 'subscribed',
  topic,
  recoverable: true,
  e: 'E1',
  o,
  was_recovering: false,
  recovered: false,
  ...extra,
});

test('connects to the first topic with rtk1 and joins the others by command', async () => {
  const { client, sockets } = setup();
  client.subscribe('general');
  client.subscribe('random', { since: { offset: 7, epoch: 'E9' } });
  client.connect();
  await settle();
  assert.equal(sockets.length, 1);
  const url = new URL(sockets[0].url);
  assert.equal(url.pathname, '/ws/general');
  assert.equal(url.searchParams.get('proto'), 'rtk1');
  assert.equal(url.searchParams.get('token'), 'tok');
  assert.equal(url.searchParams.get('since'), null);
  sockets[0].open();
  assert.equal(client.state, State.CONNECTED);
  assert.deepEqual(sockets[0].sent, [{ type: 'subscribe', topic: 'random', since: { o: 7, e: 'E9' } }]);
});

test('publications are delivered once, in order, and duplicates by offset are dropped', async () => {
  const { client, sockets, events } = setup();
  client.subscribe('general');
  client.connect();
  await settle();
  const ws = sockets[0];
  ws.open();
  ws.receive(pub('general', 1)); // before `subscribed`: ignored
  ws.receive(subscribed('general', 3));
  ws.receive(pub('general', 3)); // the client has 3 already
  ws.receive(pub('general', 4));
  ws.receive(pub('general', 5));
  ws.receive(pub('general', 4)); // a duplicate
  ws.receive(pub('general', 6));
  assert.deepEqual(of(events, 'publication').map((p) => p.offset), [4, 5, 6]);
  assert.deepEqual(client.position('general'), { offset: 6, epoch: 'E1' });
});

test('a skipped offset makes the client ask again from its position', async () => {
  const { client, sockets, events } = setup();
  client.subscribe('general');
  client.connect();
  await settle();
  const ws = sockets[0];
  ws.open();
  ws.receive(subscribed('general', 10));
  ws.receive(pub('general', 11));
  ws.receive(pub('general', 13)); // 12 is missing
  assert.deepEqual(ws.sent.at(-1), { type: 'subscribe', topic: 'general', since: { o: 11, e: 'E1' } });
  ws.receive(pub('general', 14)); // in flight before the server saw the subscribe: ignored
  ws.receive(subscribed('general', 11, { was_recovering: true, recovered: true }));
  for (const o of [12, 13, 14, 15]) ws.receive(pub('general', o));
  assert.deepEqual(of(events, 'publication').map((p) => p.offset), [11, 12, 13, 14, 15]);
  assert.deepEqual(of(events, 'lost'), []);
});

test('a reconnect sends each position, and a failed recovery is reported as lost', async () => {
  const { client, sockets, events, timers } = setup();
  client.subscribe('general');
  client.subscribe('random');
  client.connect();
  await settle();
  let ws = sockets[0];
  ws.open();
  ws.receive(subscribed('general', 0));
  ws.receive(subscribed('random', 0, { e: 'R1' }));
  ws.receive(pub('general', 1));
  ws.receive(pub('random', 1, 'x', 'R1'));
  ws.drop(1011);
  assert.equal(client.state, State.CONNECTING);
  timers.runAll();
  await settle();
  ws = sockets[1];
  const url = new URL(ws.url);
  assert.equal(url.searchParams.get('since'), '1');
  assert.equal(url.searchParams.get('epoch'), 'E1');
  ws.open();
  assert.deepEqual(ws.sent, [{ type: 'subscribe', topic: 'random', since: { o: 1, e: 'R1' } }]);
  ws.receive(subscribed('general', 1, { was_recovering: true, recovered: true }));
  ws.receive(subscribed('random', 5, { e: 'R2', was_recovering: true, recovered: false }));
  assert.deepEqual(of(events, 'lost'), [{ topic: 'random', reason: 'recovery_failed' }]);
  assert.deepEqual(client.position('random'), { offset: 5, epoch: 'R2' });
});

test('insufficient_state resubscribes from the position; lost only if that fails', async () => {
  const { client, sockets, events } = setup();
  client.subscribe('general');
  client.connect();
  await settle();
  const ws = sockets[0];
  ws.open();
  ws.receive(subscribed('general', 0));
  ws.receive(pub('general', 1));
  ws.receive({ type: 'insufficient_state', topic: 'general' });
  assert.deepEqual(ws.sent.at(-1), { type: 'subscribe', topic: 'general', since: { o: 1, e: 'E1' } });
  ws.receive(subscribed('general', 1, { was_recovering: true, recovered: true }));
  ws.receive(pub('general', 2));
  assert.deepEqual(of(events, 'lost'), []);
  ws.receive({ type: 'insufficient_state', topic: 'general' });
  ws.receive(subscribed('general', 90, { was_recovering: true, recovered: false }));
  assert.deepEqual(of(events, 'lost'), [{ topic: 'general', reason: 'recovery_failed' }]);
});

test('backoff grows with jitter up to its cap and starts over once subscribed', async () => {
  const { client, sockets, timers } = setup({ backoff: { initial: 100, max: 1_000, factor: 2 } });
  client.subscribe('general');
  client.connect();
  await settle();
  const delays = [];
  for (let i = 0; i < 6; i++) {
    sockets.at(-1).open();
    sockets.at(-1).drop(1011);
    delays.push(timers.delays()[0]);
    timers.runAll();
    await settle();
  }
  assert.deepEqual(delays, [100, 200, 400, 800, 1_000, 1_000]);
  sockets.at(-1).open();
  sockets.at(-1).receive(subscribed('general', 0));
  sockets.at(-1).drop(1011);
  assert.deepEqual(timers.delays(), [100]);
});

test('jitter spreads the delay below the ceiling, never under half the initial delay', () => {
  const low = new Client('ws://a/ws', { WebSocket: class {}, random: () => 0 });
  assert.equal(low.backoffDelay(), 250);
  const mid = new Client('ws://a/ws', { WebSocket: class {}, random: () => 0.5 });
  mid.attempt = 3;
  assert.equal(mid.backoffDelay(), 2_000);
});

test('going away (1001) tries the next server soon', async () => {
  const { client, sockets, timers } = setup({ random: () => 0.5 });
  client.subscribe('general');
  client.connect();
  await settle();
  sockets[0].open();
  sockets[0].drop(1001);
  assert.deepEqual(timers.delays(), [500]);
  timers.runAll();
  await settle();
  assert.ok(sockets[1].url.startsWith('ws://b/ws/general'));
});

test('a slow-consumer close (1008) and an internal error (1011) back off and report', async () => {
  for (const code of [1008, 1011]) {
    const { client, sockets, timers, events } = setup();
    client.subscribe('general');
    client.connect();
    await settle();
    sockets[0].open();
    sockets[0].drop(code, 'why');
    assert.deepEqual(of(events, 'error'), [{ type: 'closed', code, reason: 'why' }]);
    assert.deepEqual(timers.delays(), [500]);
    assert.equal(client.state, State.CONNECTING);
  }
});

test('a refused upgrade (401/403) is reported and not retried', async () => {
  for (const status of [401, 403]) {
    const { client, sockets, timers, events } = setup({ fetch: async () => ({ status }) });
    client.subscribe('general');
    client.connect();
    await settle();
    sockets[0].drop(1006); // never opened
    await settle();
    assert.equal(client.state, State.DISCONNECTED);
    assert.deepEqual(timers.delays(), []);
    const [error] = of(events, 'error');
    assert.equal(error.type, 'refused');
    assert.equal(error.status, status);
    assert.ok(!error.url.includes('token=tok'), 'the token is not repeated in errors');
  }
});

test('a server that cannot be reached is retried on the next URL', async () => {
  const { client, sockets, timers } = setup({ fetch: async () => { throw new Error('down'); } });
  client.subscribe('general');
  client.connect();
  await settle();
  sockets[0].drop(1006);
  await settle();
  assert.equal(timers.delays().length, 1);
  timers.runAll();
  await settle();
  assert.ok(sockets[1].url.startsWith('ws://b/ws/general'));
});

test('the token provider is asked on every connect', async () => {
  let calls = 0;
  const { client, sockets, timers } = setup({ token: async () => `t${++calls}` });
  client.subscribe('general');
  client.connect();
  await settle();
  sockets[0].open();
  sockets[0].drop(1011);
  timers.runAll();
  await settle();
  assert.equal(new URL(sockets[1].url).searchParams.get('token'), 't2');
});

test('messages sent while disconnected go out after the subscribes, bounded', async () => {
  const { client, sockets } = setup({ sendBuffer: 2 });
  client.subscribe('general');
  client.subscribe('random');
  assert.equal(client.send({ hello: 1 }), true);
  assert.equal(client.send('"Ping"'), true);
  assert.equal(client.send({ hello: 3 }), false);
  client.connect();
  await settle();
  sockets[0].open();
  assert.deepEqual(sockets[0].sent, [{ type: 'subscribe', topic: 'random' }, { hello: 1 }, 'Ping']);
});

test('presence asks and resolves; join and leave are events', async () => {
  const { client, sockets, events } = setup();
  client.subscribe('general');
  client.connect();
  await settle();
  sockets[0].open();
  const users = client.presence('general');
  assert.deepEqual(sockets[0].sent.at(-1), { type: 'presence', topic: 'general' });
  sockets[0].receive({ type: 'presence', topic: 'general', users: [{ user: 'ann', connections: 2, info: {} }] });
  assert.deepEqual(await users, [{ user: 'ann', connections: 2, info: {} }]);
  sockets[0].receive({ type: 'join', topic: 'general', user: 'bob', info: { name: 'Bob' } });
  sockets[0].receive({ type: 'leave', topic: 'general', user: 'bob', info: { name: 'Bob' } });
  assert.deepEqual(of(events, 'join'), [{ topic: 'general', user: 'bob', info: { name: 'Bob' } }]);
  assert.equal(of(events, 'leave').length, 1);
});

test('presence of a topic the server does not track rejects with its error', async () => {
  const { client, sockets, events } = setup();
  client.subscribe('general');
  client.connect();
  await settle();
  sockets[0].open();
  const users = client.presence('private');
  const message = 'presence private: the topic does not track presence';
  sockets[0].receive({ type: 'error', topic: 'private', message });
  await assert.rejects(users, { message });
  assert.deepEqual(of(events, 'error'), [{ type: 'server', message, topic: 'private' }]);
  // The next request is answered as usual.
  const again = client.presence('general');
  sockets[0].receive({ type: 'presence', topic: 'general', users: [] });
  assert.deepEqual(await again, []);
});

test('disconnect stops reconnecting and keeps positions', async () => {
  const { client, sockets, timers } = setup();
  client.subscribe('general');
  client.connect();
  await settle();
  sockets[0].open();
  sockets[0].receive(subscribed('general', 4));
  client.disconnect();
  assert.equal(sockets[0].closed, 1000);
  sockets[0].drop(1000); // the close event of the socket we closed: ignored
  assert.deepEqual(timers.delays(), []);
  assert.equal(client.state, State.DISCONNECTED);
  client.connect();
  await settle();
  assert.equal(new URL(sockets[1].url).searchParams.get('since'), '4');
});

test('a frame that is not JSON is an error event, and the client carries on', async () => {
  const { client, sockets, events } = setup();
  client.subscribe('general');
  client.connect();
  await settle();
  sockets[0].open();
  sockets[0].receive('not json');
  sockets[0].receive(subscribed('general', 0));
  sockets[0].receive(pub('general', 1));
  assert.equal(of(events, 'error')[0].type, 'protocol');
  assert.equal(of(events, 'publication').length, 1);
});

test('recent asks for the latest publications once, and a refusal is not a loss', async () => {
  const { client, sockets, events } = setup();
  client.subscribe('general', { recent: 3 });
  client.subscribe('random', { recent: 5 });
  client.connect();
  await settle();
  const ws = sockets[0];
  ws.open();
  ws.receive(subscribed('general', 10));
  assert.deepEqual(ws.sent.at(-1), { type: 'subscribe', topic: 'general', since: { o: 7, e: 'E1' } });
  ws.receive(pub('general', 11)); // live, before the server saw the second subscribe
  ws.receive(subscribed('general', 7, { was_recovering: true, recovered: true }));
  for (const o of [8, 9, 10, 11]) ws.receive(pub('general', o));
  assert.deepEqual(of(events, 'publication').map((p) => p.offset), [8, 9, 10, 11]);
  // One `subscribed` for the pair, and not a recovery.
  assert.deepEqual(
    of(events, 'subscribed').map((e) => [e.topic, e.wasRecovering, e.recovered]),
    [['general', false, false]],
  );
  ws.receive(subscribed('random', 2, { e: 'R1' }));
  ws.receive(subscribed('random', 2, { e: 'R1', was_recovering: true, recovered: false }));
  assert.deepEqual(of(events, 'lost'), []);
  assert.deepEqual(client.position('random'), { offset: 2, epoch: 'R1' });
});
