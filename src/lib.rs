//! # axum-realtime-kit
//!
//! Push real-time data from an [axum] application to many thousands of WebSocket clients, and
//! scale out across instances through Redis Pub/Sub.
//!
//! You implement [`MessageHandler`](ws::handler::MessageHandler) (what clients send, what gets
//! broadcast) and, with the default `auth` feature, [`TokenValidator`](auth::TokenValidator);
//! [`upgrade_handler`](ws::upgrade::upgrade_handler) does the rest. The public API is the one of
//! 0.1.0, with one import changed.
//!
//! **Guides:** [authentication and authorisation](guides::auth) ·
//! [scaling out with Redis](guides::scaling_out) ·
//! [tuning shards, queues and limits](guides::tuning) ·
//! [history and reconnect recovery](guides::recovery) ·
//! [presence](guides::presence) ·
//! [migrating from 0.1.0](guides::migrating_from_0_1).
//!
//! # Layout
//! From the application's side down to the socket and the broker; a module uses only those
//! below it. `docs/architecture.md` in the repository has the task and lock model and the
//! numbered invariants that the code cites.
//! - [`ws`]: the public facade at 0.1.0's paths — `handler`, `service`, `upgrade`, `types`.
//!   [`auth`] (feature `auth`): `TokenValidator` and the `WsAuth` extractor. [`bind`] and
//!   [`shutdown_signal`] for serving.
//! - `connection`: one connection's life: admitted, subscribed, spawned; read, parse, run the
//!   handler; close, clean up.
//! - `service`: [`WebsocketService`](ws::service::WebsocketService) and its builder: the
//!   runtime, the application's handler and its state.
//! - `handler`: the [`MessageHandler`](ws::handler::MessageHandler) trait a connection calls.
//! - `sink`: [`WsSink`](ws::types::WsSink), which queues frames for one connection.
//! - `runtime`: wires shards, dispatcher and broker together; joins and leaves; connection
//!   accounting; shutdown.
//! - `broker`: where publishes go and deliveries come from (in-process; Redis with `REDIS_URL`).
//! - `dispatch`: frames each published message once and hands the frame to each shard holding
//!   the topic, in the broker's order.
//! - `routes`: which shards hold each topic.
//! - `shard`: topic maps, each owned by one task, and delivery to local subscribers.
//! - `outbound`: each connection's byte-bounded queue, the one rule that decides between a
//!   direct write and a batch, and the writer that drains the queue in as few writes as the
//!   socket takes.
//! - `frame`: the WebSocket codec; outbound frames are encoded once into shared `Bytes`.
//! - `topic`: which topic names are allowed.
//! - `config`, `metrics`, `shrink`: settings, counters, giving memory back after a peak.
//! - `history`: positioned topics — [`TopicPolicy`], [`Position`], the in-process history.
//! - `wire`: the formats a connection speaks (verbatim, `rtk1`) and a publication's frame in
//!   each.
//! - `presence`: who is in a topic — [`PresencePage`], [`PresenceStats`]; this instance's
//!   memberships, and `join`/`leave` (with Redis: `broker/presence.rs`).
//! - [`guides`]: authentication, scaling out, tuning, migrating from 0.1.0, history and
//!   recovery, presence (documentation only).
//!
//! # Data path
//! ```text
//! client ─GET /ws/{topic}─► WsAuth ─► validator ─► upgrade ─► connection (shard = id % N)
//!   reader: frames ─► JSON ──────► MessageHandler ─┬─ direct reply ─► this connection's queue
//!                                                  └─ ServerEvent ─► serialize once ─► broker
//! broker ─► dispatcher: encode ONE frame (Bytes) ─► each shard holding the topic, in order
//! shard: for each local subscriber of the topic
//!   ├─ quiet connection, gate open or few subscribers ─► one non-blocking write to its socket
//!   └─ otherwise ─► push the same Bytes (a refcount) onto its queue ─► writer
//! writer: wait write_delay while batching, then everything queued ─► as few writes as the socket takes
//! ```
//!
//! # Feature flags
//! | feature | default | what |
//! |---|---|---|
//! | `auth` | yes | [`auth::WsAuth`] and [`auth::TokenValidator`] |
//! | `coalescing` | no | `CoalescingService`: single-flight for expensive async operations |
//! | `prometheus` | no | `prometheus::Prometheus`: these metrics at a `/metrics` route |
//!
//! # Metrics
//! Every second (see `WebsocketServiceBuilder::metrics_interval`) the service reports to the
//! process's [`metrics`](::metrics) recorder, whichever exporter the application installed.
//! Nothing calls the recorder on the per-message path: it counts in plain atomics, and the
//! report copies them.
//! [`WebsocketService::metrics`](ws::service::WebsocketService::metrics) returns the same
//! values as a struct.
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `rtk_connections_opened_total` | counter | WebSocket connections accepted |
//! | `rtk_connections` | gauge | connections open now |
//! | `rtk_subscriptions` | gauge | topic memberships (connection × topic) now |
//! | `rtk_deliveries_total` | counter | frames queued to subscribers, one per subscriber per message |
//! | `rtk_bytes_queued_total` | counter | bytes of those frames |
//! | `rtk_bytes_written_total` | counter | bytes written to client sockets |
//! | `rtk_messages_in_total` | counter | data messages received from clients |
//! | `rtk_publishes_total` | counter | messages published through the broker |
//! | `rtk_publish_errors_total` | counter | publishes that failed |
//! | `rtk_slow_consumer_closes_total` | counter | connections closed by the slow-consumer policy |
//! | `rtk_slow_consumer_drops_total` | counter | queued messages dropped by `DropOldest` / `LatestPerTopic` |
//! | `rtk_protocol_errors_total` | counter | connections closed for a WebSocket protocol violation |
//! | `rtk_broker_reconnects_total` | counter | times the broker's subscriber connection was lost or a reconnection attempt failed (grows with every retry during an outage) |
//! | `rtk_broker_oversized_drops_total` | counter | broker messages dropped because their frame was larger than the outbound queue bound (`outbound_queue_bytes`); logged at most once per 10 s |
//! | `rtk_broker_live` | gauge | 1 while the broker connection is live, else 0 |
//! | `rtk_dispatch_lag_seconds` | gauge | longest time from the broker handing a message over to a shard finishing its fan-out, over the last report interval |
//! | `rtk_runtime_alive_tasks` | gauge | tasks alive in the tokio runtime the service runs on |
//! | `rtk_recoveries_succeeded_total` | counter | subscriptions with a position (`rtk1`, `since`) on a topic with history that got every publication they missed |
//! | `rtk_recoveries_failed_total` | counter | subscriptions with a position that could not recover (epoch changed, too many missed, expired): `recovered: false` |
//! | `rtk_recovered_publications_total` | counter | publications re-sent by successful recoveries |
//! | `rtk_insufficient_state_slow_consumer_total` | counter | `insufficient_state` sent because `DropOldest` / `LatestPerTopic` dropped a positioned frame |
//! | `rtk_broker_gaps_healed_total` | counter | runs of a positioned topic's offsets skipped by the Redis subscriber connection (down meanwhile), read back from the Redis stream and delivered in order |
//! | `rtk_insufficient_state_broker_gap_total` | counter | `insufficient_state` sent because a positioned topic's publications from Redis skipped offsets or changed epoch (lost between Redis and the instance, or Redis lost the stream) |
//! | `rtk_unpositioned_publishes_total` | counter | publications on topics without a policy while topic policies are configured: they have no position |
//! | `rtk_broker_history_reads_total` | counter | ranges of positioned topics read from the Redis stream, by recoveries (subscriptions recovering the same range at once share one read) and by gap healing |
//! | `rtk_outbound_queue_peak_bytes` | gauge | most data bytes one connection held over its outbound bound (queued, being written, a partly written frame), over the connections that have ended; at most the outbound ceiling under `SlowConsumerPolicy::Close` |

#![forbid(unsafe_code)]

#[cfg(feature = "auth")]
pub mod auth;
#[cfg(feature = "coalescing")]
pub mod coalescing;
#[cfg(feature = "prometheus")]
pub mod prometheus;
pub mod ws;

/// Guides: longer documentation that is not about one item. Each is a Markdown file in
/// `docs/guides/`, shown here and on GitHub alike; their Rust examples are compiled as doc tests.
pub mod guides {
    #[doc = include_str!("../docs/guides/auth.md")]
    pub mod auth {}

    #[doc = include_str!("../docs/guides/scaling-out.md")]
    pub mod scaling_out {}

    #[doc = include_str!("../docs/guides/tuning.md")]
    pub mod tuning {}

    #[doc = include_str!("../docs/guides/migrating-from-0.1.md")]
    pub mod migrating_from_0_1 {}

    #[doc = include_str!("../docs/guides/recovery.md")]
    pub mod recovery {}

    #[doc = include_str!("../docs/guides/presence.md")]
    pub mod presence {}
}

// For the criterion benches, the fuzz targets, the tests and the load-test tools; not a stable
// API and not in users' builds (the feature is internal: nothing outside this repository
// enables it).
#[cfg(feature = "__bench_api")]
#[doc(hidden)]
pub mod bench_api;

mod broker;
mod config;
mod connection;
mod deflate;
mod dispatch;
mod frame;
mod handler;
mod history;
mod listener;
mod metrics;
mod outbound;
mod presence;
mod routes;
mod runtime;
mod service;
mod shard;
mod shrink;
mod sink;
mod topic;
mod wire;

pub use broker::PublishError;
#[cfg(feature = "redis-tls")]
pub use broker::RedisTls;
pub use history::{HistoryEntry, HistoryPage, Position, TopicPolicy};
pub use listener::{LISTEN_BACKLOG, bind, shutdown_signal};
pub use metrics::MetricsSnapshot;
pub use outbound::SlowConsumerPolicy;
pub use presence::{PresenceEntry, PresenceError, PresencePage, PresenceStats};
pub use service::{BuildError, WebsocketServiceBuilder};

/// The common names: `use axum_realtime_kit::prelude::*;`.
pub mod prelude {
    #[cfg(feature = "auth")]
    pub use crate::auth::{TokenValidator, WsAuth};
    #[cfg(feature = "coalescing")]
    pub use crate::coalescing::CoalescingService;
    pub use crate::ws::handler::{ConnectionContext, HandlerError, MessageHandler};
    pub use crate::ws::service::WebsocketService;
    pub use crate::ws::types::WsSink;
    pub use crate::ws::upgrade::{WebSocketUpgrade, upgrade_handler};
}
