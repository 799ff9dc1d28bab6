//! Tunables of one service instance, set through
//! [`WebsocketServiceBuilder`](crate::ws::service::WebsocketServiceBuilder).

use std::time::Duration;

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
    /// How long a writer waits, once woken, for more frames to share one write.
    pub(crate) write_delay: Duration,
    /// How long a closing connection waits for the client's close frame.
    pub(crate) close_timeout: Duration,
    /// How long [`shutdown`](crate::ws::service::WebsocketService::shutdown) waits for clients.
    pub(crate) shutdown_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            shard_channel: 8192,
            max_message_size: 64 * 1024,
            outbound_queue_bytes: 1024 * 1024,
            write_delay: Duration::ZERO,
            close_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}
