//! Tunables of one service instance, set through
//! [`WebsocketServiceBuilder`](crate::ws::service::WebsocketServiceBuilder).

use std::sync::Arc;
use std::time::Duration;

use crate::outbound::SlowConsumerPolicy;

/// The runtime's settings. Every field has a default chosen for a small server; see the builder
/// methods for what each one trades.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// Number of shards (topic maps, each owned by one task).
    pub(crate) shards: usize,
    /// Capacity, in commands, of each shard's channel.
    pub(crate) shard_channel: usize,
    /// Largest inbound message (one frame, or all fragments together), in bytes.
    pub(crate) max_message_size: usize,
    /// Bound of each connection's outbound queue, in bytes.
    pub(crate) outbound_queue_bytes: usize,
    /// What a connection past that bound gets.
    pub(crate) slow_consumer: SlowConsumerPolicy,
    /// Under `SlowConsumerPolicy::Close`, how long a connection may stay over the bound.
    pub(crate) slow_consumer_grace: Duration,
    /// Under `SlowConsumerPolicy::Close`, what a connection may never hold past, grace or not;
    /// `None`: 4× `outbound_queue_bytes`.
    pub(crate) outbound_queue_ceiling: Option<usize>,
    /// A write that makes no progress for this long closes the connection.
    pub(crate) write_timeout: Duration,
    /// How long a writer under load waits, once woken, for more frames to share one write.
    pub(crate) write_delay: Duration,
    /// How long a closing connection waits for the client's close frame.
    pub(crate) close_timeout: Duration,
    /// How long [`shutdown`](crate::ws::service::WebsocketService::shutdown) waits for clients.
    pub(crate) shutdown_timeout: Duration,
    /// How often the server pings an otherwise quiet client; `ZERO` disables heartbeats.
    pub(crate) ping_interval: Duration,
    /// How long a client may stay silent (no frame at all, pongs included) after a ping.
    pub(crate) pong_timeout: Duration,
    /// Longest topic name accepted before the upgrade.
    pub(crate) max_topic_len: usize,
    /// Most topics one connection may be in at once (the one it opened with included).
    pub(crate) max_topics_per_connection: usize,
    /// Origins (normalized, see `ws::upgrade::normalize_origin`) a browser's upgrade request may
    /// come from; `None`: no check.
    pub(crate) allowed_origins: Option<Arc<[String]>>,
    /// Most open connections; further upgrades get 503.
    pub(crate) max_connections: usize,
    /// Data messages a connection may send per second on average (token bucket), and the
    /// bucket's size. `None` disables the limit.
    pub(crate) rate_limit: Option<(u32, u32)>,
    /// How long a connection may keep exceeding the rate limit before it is closed with 1008.
    pub(crate) rate_limit_grace: Duration,
    /// How often the counters are reported to the `metrics` facade; `ZERO` disables the task.
    pub(crate) metrics_interval: Duration,
    /// Labels added to every reported metric.
    pub(crate) metrics_labels: Vec<(String, String)>,
    /// Most bytes of history kept over all positioned topics.
    pub(crate) history_max_bytes: usize,
    /// Most publications one recovery re-sends.
    pub(crate) recovery_max_publications: usize,
    /// Whether a client's permessage-deflate offer is accepted.
    pub(crate) permessage_deflate: bool,
    /// With permessage-deflate, payloads shorter than this go uncompressed.
    pub(crate) permessage_deflate_min_size: u32,
    /// How often an instance renews its presence entries in Redis.
    pub(crate) presence_refresh: Duration,
    /// How long an instance's presence entries outlive its last renewal.
    pub(crate) presence_ttl: Duration,
    /// How long a connection that dropped without a close still counts as present.
    pub(crate) presence_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            shard_channel: 8192,
            max_message_size: 64 * 1024,
            outbound_queue_bytes: 1024 * 1024,
            slow_consumer: SlowConsumerPolicy::Close,
            // A client that reads drains a burst over the bound in milliseconds on a LAN and
            // within a second at ~10 Mbit/s; one that stopped reading is found within 1 s, far
            // sooner than the write timeout.
            slow_consumer_grace: crate::outbound::DEFAULT_GRACE,
            outbound_queue_ceiling: None,
            write_timeout: Duration::from_secs(10),
            // Measured (docs/performance-notes.md#chat-path-write-delay,
            // docs/performance-notes.md#write-delay-batching-rule): paid only by connections that
            // receive more than 250 frames/s or whose writes carry three frames or more. 20 ms
            // against 10 took the chat test's passing steps (p99 ≤ 100 ms) from 20 000-25 000 to
            // 30 000-45 000 messages/s; 30 ms was no better.
            write_delay: Duration::from_millis(20),
            close_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(30),
            max_topic_len: 256,
            max_topics_per_connection: 128,
            allowed_origins: None,
            max_connections: 100_000,
            rate_limit: Some((1_000, 20_000)),
            rate_limit_grace: Duration::from_secs(3),
            metrics_interval: Duration::from_secs(1),
            metrics_labels: Vec::new(),
            history_max_bytes: 64 * 1024 * 1024,
            recovery_max_publications: 300,
            permessage_deflate: false,
            permessage_deflate_min_size: crate::deflate::THRESHOLD as u32,
            // Centrifugo's defaults: an instance that died is gone within a minute.
            presence_refresh: Duration::from_secs(25),
            presence_ttl: Duration::from_secs(60),
            presence_grace: Duration::from_secs(5),
        }
    }
}
