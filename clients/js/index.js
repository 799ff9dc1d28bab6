// A client for axum-realtime-kit's `rtk1` protocol: one WebSocket per client, several topics on
// it, reconnection with back-off across a list of servers, and recovery of what was missed.
//
// What it promises the application, per positioned topic (a topic the server keeps history for):
// every publication exactly once and in order, across reconnects; or a `lost` event that says
// this can no longer be guaranteed, after which the application reloads its state.
//
// No dependencies. Works wherever there is a WebSocket constructor: browsers, Node >= 22
// (global WebSocket), or Node 20 with one passed in (`options.WebSocket`, e.g. from `ws`).

/** Connection states, in the order a healthy connection goes through them. */
export const State = Object.freeze({
  DISCONNECTED: 'disconnected',
  CONNECTING: 'connecting',
  CONNECTED: 'connected',
});

const DEFAULTS = {
  // Back-off between reconnection attempts: initial * factor^attempt, capped at max, and a
  // random part of it (full jitter), so that clients dropped together do not return together.
  backoff: { initial: 500, max: 20_000, factor: 2 },
  // After "going away" (1001: the server is restarting or being drained) the next server is
  // tried within this many milliseconds, spread at random.
  goingAwayDelay: 1_000,
  // Application messages kept while disconnected, sent once connected again.
  sendBuffer: 1_000,
  // How long `presence()` waits for its answer.
  requestTimeout: 10_000,
};

/** Close codes and what they mean to the client. */
const CLOSE = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  POLICY: 1008,
  TOO_BIG: 1009,
  INTERNAL: 1011,
});

/**
 * A client of one application: connects to the first topic subscribed, joins the others with
 * `subscribe` commands on the same connection, and keeps each topic's position.
 */
export class Client {
  /**
   * @param {string | string[]} urls WebSocket base URLs of the servers, tried in turn, e.g.
   *   `wss://chat.example.com/ws`; the client connects to `<url>/<topic>`.
   * @param {object} [options] see index.d.ts (`ClientOptions`).
   */
  constructor(urls, options = {}) {
    this.urls = (Array.isArray(urls) ? urls : [urls]).map((u) => u.replace(/\/+$/, ''));
    if (this.urls.length === 0) throw new TypeError('at least one server URL is needed');
    this.options = {
      ...DEFAULTS,
      ...options,
      backoff: { ...DEFAULTS.backoff, ...(options.backoff ?? {}) },
    };
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.WebSocket !== 'function') {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket');
    }
    // Browsers refuse `fetch` and the timer functions called on another object than the
    // window: keep them as plain functions.
    const fetch = globalThis.fetch;
    this.fetch =
      options.fetch !== undefined ? options.fetch : typeof fetch === 'function' ? (u, i) => fetch(u, i) : null;
    this.random = options.random ?? Math.random;
    this.timers = options.timers ?? {
      setTimeout: (fn, ms) => setTimeout(fn, ms),
      clearTimeout: (id) => clearTimeout(id),
    };

    this.state = State.DISCONNECTED;
    /** @type {Map<string, TopicState>} topics the application subscribed, in order. */
    this.topics = new Map();
    this.listeners = new Map();
    this.outbox = [];
    this.pending = new Map(); // topic -> [{resolve, reject, timer}]
    this.socket = null;
    this.urlIndex = 0;
    this.attempt = 0;
    this.timer = null;
    this.wanted = false; // connect() called and not disconnect()
    this.generation = 0; // bumps on every new socket: events of an old one are ignored
  }

  // ---- events ----

  /**
   * Listens to `event`; returns a function that stops listening.
   * Events: `state`, `publication`, `subscribed`, `lost`, `join`, `leave`, `presence`, `error`.
   */
  on(event, listener) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event).add(listener);
    return () => this.off(event, listener);
  }

  off(event, listener) {
    this.listeners.get(event)?.delete(listener);
  }

  emit(event, detail) {
    for (const listener of [...(this.listeners.get(event) ?? [])]) {
      try {
        listener(detail);
      } catch (err) {
        // A throwing listener must not stop the others nor the client.
        if (event !== 'error') this.emit('error', { type: 'listener', error: err });
      }
    }
  }

  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.emit('state', state);
  }

  // ---- topics ----

  /**
   * Subscribes to `topic`. With `since` ({offset, epoch}, e.g. saved from an earlier session or
   * from the application's own load of the topic's state), the server first sends what was
   * published after it. Without it, `recent: N` asks for the last N publications the server
   * still keeps (all or none: fewer than N kept means none are sent, and no `lost` fires).
   */
  subscribe(topic, { since, recent = 0 } = {}) {
    if (typeof topic !== 'string' || topic === '') throw new TypeError('topic must be a non-empty string');
    let t = this.topics.get(topic);
    if (!t) {
      t = new TopicState();
      this.topics.set(topic, t);
    }
    if (since) {
      t.epoch = since.epoch;
      t.offset = since.offset;
    } else if (recent > 0 && t.epoch === undefined) {
      t.recent = recent;
    }
    if (this.state === State.CONNECTED) {
      this.sendSubscribe(topic, t);
    } else if (this.wanted && this.state === State.DISCONNECTED) {
      this.open();
    }
  }

  /** Leaves `topic`; its position is forgotten. */
  unsubscribe(topic) {
    if (!this.topics.delete(topic)) return;
    if (this.state === State.CONNECTED) this.raw({ type: 'unsubscribe', topic });
    this.rejectPending(topic, new Error(`unsubscribed from ${topic}`));
  }

  /** The last position seen on `topic` ({offset, epoch}), if it is positioned. */
  position(topic) {
    const t = this.topics.get(topic);
    return t && t.epoch !== undefined ? { offset: t.offset, epoch: t.epoch } : undefined;
  }

  /** Asks who is in `topic`; resolves with the users ([{user, connections, info}]). */
  presence(topic) {
    if (this.state !== State.CONNECTED) return Promise.reject(new Error('not connected'));
    return new Promise((resolve, reject) => {
      const entry = { resolve, reject, timer: null };
      entry.timer = this.timers.setTimeout(() => {
        this.dropPending(topic, entry);
        reject(new Error(`no presence answer for ${topic}`));
      }, this.options.requestTimeout);
      if (!this.pending.has(topic)) this.pending.set(topic, []);
      this.pending.get(topic).push(entry);
      this.raw({ type: 'presence', topic });
    });
  }

  // ---- application messages ----

  /**
   * Sends an application message (an object is sent as JSON, a string as is): how an
   * application publishes, its server-side handler deciding what to do with it. While
   * disconnected, up to `sendBuffer` messages wait and go out once connected; returns false when
   * the message was refused because that buffer is full.
   */
  send(message) {
    const text = typeof message === 'string' ? message : JSON.stringify(message);
    if (this.state === State.CONNECTED && this.socket) {
      this.socket.send(text);
      return true;
    }
    if (this.outbox.length >= this.options.sendBuffer) return false;
    this.outbox.push(text);
    return true;
  }

  /** Same as `send`. */
  publish(message) {
    return this.send(message);
  }

  // ---- connection ----

  /** Connects (once a topic is subscribed) and keeps reconnecting until `disconnect()`. */
  connect() {
    this.wanted = true;
    if (this.state === State.DISCONNECTED && this.topics.size > 0) this.open();
  }

  /** Closes the connection and stops reconnecting. Positions are kept for a later `connect()`. */
  disconnect() {
    this.wanted = false;
    this.cancelTimer();
    this.generation += 1;
    const socket = this.socket;
    this.socket = null;
    if (socket) {
      try {
        socket.close(CLOSE.NORMAL);
      } catch {
        // Already closed.
      }
    }
    this.failPending(new Error('disconnected'));
    this.setState(State.DISCONNECTED);
  }

  async open() {
    this.cancelTimer();
    const first = this.topics.keys().next();
    if (first.done || !this.wanted) {
      this.setState(State.DISCONNECTED);
      return;
    }
    const generation = ++this.generation;
    this.setState(State.CONNECTING);
    let token;
    try {
      token = typeof this.options.token === 'function' ? await this.options.token() : this.options.token;
    } catch (error) {
      if (generation !== this.generation) return;
      this.emit('error', { type: 'token', error });
      this.retry(this.backoffDelay());
      return;
    }
    if (generation !== this.generation) return;
    const url = this.url(first.value, token);
    let socket;
    try {
      socket = new this.WebSocket(url, 'rtk1');
    } catch (error) {
      this.emit('error', { type: 'connect', error });
      this.nextUrl();
      this.retry(this.backoffDelay());
      return;
    }
    this.socket = socket;
    let opened = false;
    socket.onopen = () => {
      if (generation !== this.generation) return;
      opened = true;
      this.onOpen(first.value);
    };
    socket.onmessage = (event) => {
      if (generation !== this.generation) return;
      this.onMessage(event.data);
    };
    socket.onclose = (event) => {
      if (generation !== this.generation) return;
      this.socket = null;
      this.onClose(event.code, event.reason, opened, url);
    };
    socket.onerror = () => {
      // Followed by a close event, which decides what happens.
    };
  }

  /** `<base>/<topic>?proto=rtk1&token=…[&since=…&epoch=…]` for the next server. */
  url(topic, token) {
    const base = this.urls[this.urlIndex % this.urls.length];
    const params = new URLSearchParams({ proto: 'rtk1' });
    if (token) params.set('token', token);
    const t = this.topics.get(topic);
    if (t.epoch !== undefined) {
      params.set('since', String(t.offset));
      params.set('epoch', t.epoch);
    }
    return `${base}/${encodeURIComponent(topic)}?${params}`;
  }

  onOpen(pathTopic) {
    this.setState(State.CONNECTED);
    for (const [topic, t] of this.topics) {
      t.resyncing = true; // until its `subscribed` arrives
      if (topic !== pathTopic) this.sendSubscribe(topic, t);
    }
    const outbox = this.outbox;
    this.outbox = [];
    for (const text of outbox) this.socket.send(text);
  }

  onClose(code, reason, opened, url) {
    this.failPending(new Error(`connection closed (${code})`));
    if (!this.wanted) {
      this.setState(State.DISCONNECTED);
      return;
    }
    this.setState(State.CONNECTING);
    if (!opened) {
      // A refused upgrade looks the same as a network failure to a WebSocket; ask the server
      // over plain HTTP whether the token or topic was refused, so as not to retry forever.
      this.nextUrl();
      this.probe(url).then((status) => {
        if (!this.wanted || this.socket) return;
        if (status === 401 || status === 403 || status === 404) {
          this.wanted = false;
          this.emit('error', { type: 'refused', status, url: redact(url) });
          this.setState(State.DISCONNECTED);
        } else {
          this.retry(this.backoffDelay());
        }
      });
      return;
    }
    switch (code) {
      case CLOSE.GOING_AWAY:
        // The server is shutting down: another one is probably fine at once.
        this.nextUrl();
        this.retry(this.random() * this.options.goingAwayDelay);
        break;
      case CLOSE.TOO_BIG:
        this.emit('error', { type: 'closed', code, reason, message: 'a message sent was too big' });
        this.retry(this.backoffDelay());
        break;
      case CLOSE.POLICY: // slow consumer, or another policy the server enforces
      case CLOSE.INTERNAL:
      default:
        if (code !== CLOSE.NORMAL && code !== CLOSE.ABNORMAL) {
          this.emit('error', { type: 'closed', code, reason });
        }
        if (code === CLOSE.ABNORMAL) this.nextUrl();
        this.retry(this.backoffDelay());
    }
  }

  /** The HTTP status of the upgrade URL fetched as a plain GET, or 0 if unknown. */
  async probe(url) {
    if (typeof this.fetch !== 'function') return 0;
    try {
      const response = await this.fetch(url.replace(/^ws/, 'http'), { method: 'GET' });
      return response.status;
    } catch {
      return 0;
    }
  }

  backoffDelay() {
    const { initial, max, factor } = this.options.backoff;
    const ceiling = Math.min(max, initial * factor ** this.attempt);
    this.attempt += 1;
    // Full jitter, but never less than half the initial delay.
    return Math.max(initial / 2, this.random() * ceiling);
  }

  retry(delay) {
    this.cancelTimer();
    this.timer = this.timers.setTimeout(() => {
      this.timer = null;
      if (this.wanted) this.open();
    }, delay);
  }

  cancelTimer() {
    if (this.timer !== null) {
      this.timers.clearTimeout(this.timer);
      this.timer = null;
    }
  }

  nextUrl() {
    this.urlIndex = (this.urlIndex + 1) % this.urls.length;
  }

  // ---- protocol ----

  raw(command) {
    this.socket?.send(JSON.stringify(command));
  }

  sendSubscribe(topic, t) {
    t.resyncing = true;
    const command = { type: 'subscribe', topic };
    if (t.epoch !== undefined) command.since = { o: t.offset, e: t.epoch };
    this.raw(command);
  }

  onMessage(data) {
    if (typeof data !== 'string') return; // rtk1 frames are text
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this.emit('error', { type: 'protocol', message: 'a frame that is not JSON', data });
      return;
    }
    const t = msg && typeof msg.topic === 'string' ? this.topics.get(msg.topic) : undefined;
    switch (msg?.type) {
      case 'pub':
        if (t) this.onPub(msg, t);
        break;
      case 'subscribed':
        if (t) this.onSubscribed(msg, t);
        break;
      case 'insufficient_state':
        if (t) this.onInsufficientState(msg.topic, t);
        break;
      case 'join':
      case 'leave':
        if (t) this.emit(msg.type, { topic: msg.topic, user: msg.user, info: msg.info });
        break;
      case 'presence': {
        const queue = this.pending.get(msg.topic);
        const entry = queue?.shift();
        if (entry) {
          this.timers.clearTimeout(entry.timer);
          entry.resolve(msg.users ?? []);
        }
        if (t) this.emit('presence', { topic: msg.topic, users: msg.users ?? [] });
        break;
      }
      case 'error': {
        // An error about a topic answers the oldest request about it (presence): it fails.
        const entry = typeof msg.topic === 'string' ? this.pending.get(msg.topic)?.shift() : undefined;
        if (entry) {
          this.timers.clearTimeout(entry.timer);
          entry.reject(new Error(msg.message));
        }
        const error = { type: 'server', message: msg.message };
        if (typeof msg.topic === 'string') error.topic = msg.topic;
        this.emit('error', error);
        break;
      }
      default:
        // Not a frame of the protocol: something the application sent to this connection alone.
        this.emit('message', msg);
    }
  }

  onSubscribed(msg, t) {
    this.attempt = 0; // the server took us: a later drop starts the back-off over
    if (t.recent > 0 && msg.recoverable && !msg.was_recovering && msg.o > 0) {
      // A first subscribe that wants the latest publications: ask again from before them.
      t.epoch = msg.e;
      t.offset = Math.max(0, msg.o - t.recent);
      t.recent = 0;
      t.fetchingRecent = true;
      this.sendSubscribe(msg.topic, t);
      return;
    }
    t.recent = 0;
    // Fetching recent publications is not a recovery: nothing was missed if they are not there.
    const wasRecovering = !!msg.was_recovering && !t.fetchingRecent;
    const lost = wasRecovering && !msg.recovered;
    t.fetchingRecent = false;
    t.resyncing = false;
    if (msg.recoverable) {
      t.epoch = msg.e;
      t.offset = msg.o;
    } else {
      t.epoch = undefined;
      t.offset = undefined;
    }
    this.emit('subscribed', {
      topic: msg.topic,
      recoverable: !!msg.recoverable,
      wasRecovering,
      recovered: wasRecovering && !!msg.recovered,
      position: this.position(msg.topic),
    });
    if (lost) this.emit('lost', { topic: msg.topic, reason: 'recovery_failed' });
  }

  onPub(msg, t) {
    const positioned = typeof msg.o === 'number' && typeof msg.e === 'string';
    if (t.resyncing) return; // what follows the coming `subscribed` is what counts
    if (positioned && t.epoch === msg.e && t.offset !== undefined) {
      if (msg.o <= t.offset) return; // already delivered
      if (msg.o > t.offset + 1) {
        // A gap the server did not report: ask again from the last position held.
        this.sendSubscribe(msg.topic, t);
        return;
      }
    }
    if (positioned) {
      t.epoch = msg.e;
      t.offset = msg.o;
    }
    this.emit('publication', {
      topic: msg.topic,
      data: msg.d,
      offset: positioned ? msg.o : undefined,
      epoch: positioned ? msg.e : undefined,
    });
  }

  onInsufficientState(topic, t) {
    if (t.epoch === undefined) {
      // No history to recover from: the application must reload.
      this.emit('lost', { topic, reason: 'insufficient_state' });
      return;
    }
    // Recover from the last position held; `lost` follows only if that fails.
    this.sendSubscribe(topic, t);
  }

  dropPending(topic, entry) {
    const queue = this.pending.get(topic);
    const i = queue ? queue.indexOf(entry) : -1;
    if (i >= 0) queue.splice(i, 1);
  }

  rejectPending(topic, error) {
    for (const entry of this.pending.get(topic) ?? []) {
      this.timers.clearTimeout(entry.timer);
      entry.reject(error);
    }
    this.pending.delete(topic);
  }

  failPending(error) {
    for (const topic of [...this.pending.keys()]) this.rejectPending(topic, error);
  }
}

/** What the client keeps per topic. */
class TopicState {
  constructor() {
    /** @type {string | undefined} */
    this.epoch = undefined;
    /** @type {number | undefined} last offset delivered to the application */
    this.offset = undefined;
    /** waiting for `subscribed`: publications are ignored until it arrives */
    this.resyncing = false;
    /** publications to ask for after the first `subscribed` */
    this.recent = 0;
    /** the subscribe that asks for them is on its way */
    this.fetchingRecent = false;
  }
}

/** `url` without its token, for messages. */
function redact(url) {
  return url.replace(/([?&]token=)[^&]*/, '$1…');
}
