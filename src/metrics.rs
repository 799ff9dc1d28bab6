//! Counters and gauges of one service instance.
//!
//! Every counter is a relaxed atomic: they are statistics, read on demand, that order nothing.
//! The hot path touches them once per shard per delivered message (not once per subscriber).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters; read a consistent-enough copy with [`Metrics::snapshot`].
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    connections_opened: AtomicU64,
    connections_active: AtomicU64,
    deliveries: AtomicU64,
    bytes_queued: AtomicU64,
    slow_consumer_closes: AtomicU64,
    protocol_errors: AtomicU64,
    messages_in: AtomicU64,
    publishes: AtomicU64,
    publish_errors: AtomicU64,
    broker_reconnects: AtomicU64,
    slow_consumer_drops: AtomicU64,
}

/// A copy of the service's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Connections accepted since start.
    pub connections_opened: u64,
    /// Connections open now.
    pub connections_active: u64,
    /// Frames queued to subscribers (one per subscriber per message).
    pub deliveries: u64,
    /// Bytes of those frames.
    pub bytes_queued: u64,
    /// Connections closed by the slow-consumer policy.
    pub slow_consumer_closes: u64,
    /// Connections closed for a WebSocket protocol violation.
    pub protocol_errors: u64,
    /// Data messages received from clients.
    pub messages_in: u64,
    /// Messages published through the broker.
    pub publishes: u64,
    /// Publishes that failed.
    pub publish_errors: u64,
    /// Times the broker's subscriber connection was lost and rebuilt.
    pub broker_reconnects: u64,
    /// Queued messages dropped by the `DropOldest` and `LatestPerTopic` slow-consumer policies.
    pub slow_consumer_drops: u64,
}

impl Metrics {
    pub(crate) fn connection_opened(&self) {
        self.connections_opened.fetch_add(1, Relaxed);
        self.connections_active.fetch_add(1, Relaxed);
    }
    pub(crate) fn connection_closed(&self) {
        self.connections_active.fetch_sub(1, Relaxed);
    }
    pub(crate) fn add_deliveries(&self, n: u64, bytes: u64) {
        if n > 0 {
            self.deliveries.fetch_add(n, Relaxed);
            self.bytes_queued.fetch_add(bytes, Relaxed);
        }
    }
    pub(crate) fn add_slow_consumers(&self, n: u64) {
        self.slow_consumer_closes.fetch_add(n, Relaxed);
    }
    pub(crate) fn add_slow_consumer_drops(&self, n: u64) {
        self.slow_consumer_drops.fetch_add(n, Relaxed);
    }
    pub(crate) fn protocol_error(&self) {
        self.protocol_errors.fetch_add(1, Relaxed);
    }
    pub(crate) fn message_in(&self) {
        self.messages_in.fetch_add(1, Relaxed);
    }
    pub(crate) fn published(&self, ok: bool) {
        if ok {
            self.publishes.fetch_add(1, Relaxed);
        } else {
            self.publish_errors.fetch_add(1, Relaxed);
        }
    }
    pub(crate) fn broker_reconnect(&self) {
        self.broker_reconnects.fetch_add(1, Relaxed);
    }
    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            connections_opened: self.connections_opened.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            deliveries: self.deliveries.load(Relaxed),
            bytes_queued: self.bytes_queued.load(Relaxed),
            slow_consumer_closes: self.slow_consumer_closes.load(Relaxed),
            protocol_errors: self.protocol_errors.load(Relaxed),
            messages_in: self.messages_in.load(Relaxed),
            publishes: self.publishes.load(Relaxed),
            publish_errors: self.publish_errors.load(Relaxed),
            broker_reconnects: self.broker_reconnects.load(Relaxed),
            slow_consumer_drops: self.slow_consumer_drops.load(Relaxed),
        }
    }
}
