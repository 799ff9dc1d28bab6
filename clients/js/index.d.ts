// Types of axum-realtime-kit's JavaScript client (index.js).

export declare const State: {
  readonly DISCONNECTED: 'disconnected';
  readonly CONNECTING: 'connecting';
  readonly CONNECTED: 'connected';
};
export type State = (typeof State)[keyof typeof State];

/** A place in a positioned topic's stream. */
export interface Position {
  offset: number;
  epoch: string;
}

export interface ClientOptions {
  /** The token, or a function asked for one before every connection attempt. */
  token?: string | (() => string | Promise<string>);
  /** A WebSocket constructor where there is no global one (Node 20: `import { WebSocket } from 'ws'`). */
  WebSocket?: new (url: string, protocol?: string | string[]) => WebSocketLike;
  /** Used to ask the server why an upgrade failed (401/403/404 stop reconnecting); `null` turns that off. */
  fetch?: ((url: string, init?: object) => Promise<{ status: number }>) | null;
  /** Reconnection back-off in milliseconds: `initial * factor^attempt`, capped at `max`, with full jitter. */
  backoff?: { initial?: number; max?: number; factor?: number };
  /** After a 1001 (going away), the next server is tried within this many milliseconds. */
  goingAwayDelay?: number;
  /** Application messages kept while disconnected (default 1000). */
  sendBuffer?: number;
  /** How long `presence()` waits for its answer, in milliseconds. */
  requestTimeout?: number;
  /** Random numbers in [0, 1), for the jitter (tests pass their own). */
  random?: () => number;
  /** Timer functions (tests pass their own). */
  timers?: { setTimeout: (fn: () => void, ms: number) => unknown; clearTimeout: (id: unknown) => void };
}

export interface WebSocketLike {
  readonly extensions?: string;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
}

export interface Publication {
  topic: string;
  /** The payload: the published JSON value, or the payload as a string when it is not JSON. */
  data: unknown;
  /** Set on positioned topics. */
  offset?: number;
  epoch?: string;
}

export interface Subscribed {
  topic: string;
  recoverable: boolean;
  wasRecovering: boolean;
  recovered: boolean;
  position?: Position;
}

export interface Lost {
  topic: string;
  /** `recovery_failed`: the server could not send everything missed; `insufficient_state`: a topic without history lost messages. */
  reason: 'recovery_failed' | 'insufficient_state';
}

export interface PresenceUser {
  user: string;
  connections: number;
  info: unknown;
}

export interface PresenceChange {
  topic: string;
  user: string;
  info: unknown;
}

export type ClientError =
  | { type: 'refused'; status: number; url: string }
  | { type: 'closed'; code: number; reason: string; message?: string }
  | { type: 'server'; message: string; topic?: string }
  | { type: 'protocol'; message: string; data: unknown }
  | { type: 'token' | 'connect' | 'listener'; error: unknown };

export interface ClientEvents {
  state: State;
  publication: Publication;
  subscribed: Subscribed;
  lost: Lost;
  join: PresenceChange;
  leave: PresenceChange;
  presence: { topic: string; users: PresenceUser[] };
  error: ClientError;
  /** A frame that is not part of the protocol: a reply the application sent to this connection. */
  message: unknown;
}

export declare class Client {
  constructor(urls: string | string[], options?: ClientOptions);
  readonly state: State;
  on<E extends keyof ClientEvents>(event: E, listener: (detail: ClientEvents[E]) => void): () => void;
  off<E extends keyof ClientEvents>(event: E, listener: (detail: ClientEvents[E]) => void): void;
  /** `since` recovers from a saved position; otherwise `recent` asks for the last N publications kept. */
  subscribe(topic: string, options?: { since?: Position; recent?: number }): void;
  /** The current WebSocket, for inspection (e.g. its `extensions`); `null` while disconnected. */
  readonly socket: WebSocketLike | null;
  unsubscribe(topic: string): void;
  position(topic: string): Position | undefined;
  presence(topic: string): Promise<PresenceUser[]>;
  send(message: unknown): boolean;
  publish(message: unknown): boolean;
  connect(): void;
  disconnect(): void;
}
