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
    subscriptions: AtomicU64,
    bytes_written: AtomicU64,
    broker_oversized_drops: AtomicU64,
    /// Longest dispatch lag seen since it was last taken, in microseconds.
    dispatch_lag_max_us: AtomicU64,
    outbound_queue_peak_bytes: AtomicU64,
    recoveries_ok: AtomicU64,
    recoveries_failed: AtomicU64,
    recovered_publications: AtomicU64,
    insufficient_state_slow: AtomicU64,
    insufficient_state_broker: AtomicU64,
    gaps_healed: AtomicU64,
    unpositioned_publishes: AtomicU64,
    history_reads: AtomicU64,
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
    /// Times the broker's subscriber connection was lost or a (re)connection attempt failed:
    /// during an outage it grows with every retry.
    pub broker_reconnects: u64,
    /// Queued messages dropped by the `DropOldest` and `LatestPerTopic` slow-consumer policies.
    pub slow_consumer_drops: u64,
    /// Topic memberships now: one per connection per topic it has joined.
    pub subscriptions: u64,
    /// Bytes written to client sockets (frames of every kind, after batching).
    pub bytes_written: u64,
    /// Most data bytes one connection held while over its outbound bound (queued, being
    /// written, and a partly written frame), over the connections that have ended; 0 while none
    /// went over. Never more than the outbound ceiling under `SlowConsumerPolicy::Close`.
    pub outbound_queue_peak_bytes: u64,
    /// Broker messages dropped because their frame was larger than the outbound queue bound
    /// (`outbound_queue_bytes`): no subscriber could have queued them.
    pub broker_oversized_drops: u64,
    /// Subscriptions with a position on a topic with history that got every publication they
    /// missed (`recovered: true`).
    pub recoveries_succeeded: u64,
    /// Subscriptions with a position that could not recover (epoch changed, too many missed,
    /// expired): `recovered: false`, and none of the publications.
    pub recoveries_failed: u64,
    /// Publications re-sent by successful recoveries.
    pub recovered_publications: u64,
    /// `insufficient_state` sent because the slow-consumer policy dropped a positioned frame.
    pub insufficient_state_slow_consumer: u64,
    /// `insufficient_state` sent because the broker's stream of a positioned topic skipped
    /// offsets or changed epoch (publications lost between Redis and this instance).
    pub insufficient_state_broker_gap: u64,
    /// Runs of publications from Redis that skipped offsets, read back from the Redis stream
    /// and delivered in order before the ones that followed.
    pub broker_gaps_healed: u64,
    /// Publications on topics without a policy while policies are configured: they have no
    /// position.
    pub unpositioned_publishes: u64,
    /// Ranges of positioned topics read from the Redis stream: by recoveries (one read per
    /// range however many subscriptions recover it at once) and by gap healing.
    pub broker_history_reads: u64,
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
    pub(crate) fn subscribed(&self) {
        self.subscriptions.fetch_add(1, Relaxed);
    }
    pub(crate) fn unsubscribed(&self) {
        self.subscriptions.fetch_sub(1, Relaxed);
    }
    pub(crate) fn recovery(&self, recovered: bool, publications: usize) {
        if recovered {
            self.recoveries_ok.fetch_add(1, Relaxed);
            self.recovered_publications
                .fetch_add(publications as u64, Relaxed);
        } else {
            self.recoveries_failed.fetch_add(1, Relaxed);
        }
    }
    pub(crate) fn insufficient_state_slow(&self) {
        self.insufficient_state_slow.fetch_add(1, Relaxed);
    }

    pub(crate) fn gap_healed(&self) {
        self.gaps_healed.fetch_add(1, Relaxed);
    }

    pub(crate) fn insufficient_state_broker(&self) {
        self.insufficient_state_broker.fetch_add(1, Relaxed);
    }
    pub(crate) fn history_read(&self) {
        self.history_reads.fetch_add(1, Relaxed);
    }
    pub(crate) fn unpositioned_publish(&self) {
        self.unpositioned_publishes.fetch_add(1, Relaxed);
    }
    pub(crate) fn broker_oversized_drop(&self) {
        self.broker_oversized_drops.fetch_add(1, Relaxed);
    }
    pub(crate) fn add_bytes_written(&self, n: u64) {
        self.bytes_written.fetch_add(n, Relaxed);
    }
    /// Folds in an ended connection's peak of data held over its bound (once per connection).
    pub(crate) fn outbound_queue_peak(&self, bytes: usize) {
        if bytes > 0 {
            self.outbound_queue_peak_bytes
                .fetch_max(bytes as u64, Relaxed);
        }
    }
    /// Records how long a published message took from the broker to the end of one shard's
    /// fan-out. Called once per message per shard.
    pub(crate) fn dispatch_lag(&self, lag: std::time::Duration) {
        let us = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
        if us > self.dispatch_lag_max_us.load(Relaxed) {
            self.dispatch_lag_max_us.fetch_max(us, Relaxed);
        }
    }
    /// The longest dispatch lag since the previous call.
    pub(crate) fn take_dispatch_lag_max(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.dispatch_lag_max_us.swap(0, Relaxed))
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
            subscriptions: self.subscriptions.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            outbound_queue_peak_bytes: self.outbound_queue_peak_bytes.load(Relaxed),
            broker_oversized_drops: self.broker_oversized_drops.load(Relaxed),
            recoveries_succeeded: self.recoveries_ok.load(Relaxed),
            recoveries_failed: self.recoveries_failed.load(Relaxed),
            recovered_publications: self.recovered_publications.load(Relaxed),
            insufficient_state_slow_consumer: self.insufficient_state_slow.load(Relaxed),
            insufficient_state_broker_gap: self.insufficient_state_broker.load(Relaxed),
            broker_gaps_healed: self.gaps_healed.load(Relaxed),
            unpositioned_publishes: self.unpositioned_publishes.load(Relaxed),
            broker_history_reads: self.history_reads.load(Relaxed),
        }
    }
}

/// What [`export`] reads the reported values from.
pub(crate) struct Reading {
    snapshot: MetricsSnapshot,
    dispatch_lag: std::time::Duration,
    alive_tasks: usize,
    broker_live: bool,
}

/// How one metric is reported, and where its value comes from.
pub(crate) enum Value {
    /// Monotonic since the service started.
    Counter(fn(&Reading) -> u64),
    /// A current value.
    Gauge(fn(&Reading) -> f64),
}

impl Value {
    /// The kind's name, as in the crate docs' table.
    #[cfg(test)]
    fn kind(&self) -> &'static str {
        match self {
            Self::Counter(_) => "counter",
            Self::Gauge(_) => "gauge",
        }
    }
}

/// Every metric [`export`] reports to the [`metrics`] facade: its name, kind and source, and
/// its meaning.
#[rustfmt::skip]
pub(crate) const METRICS: &[(&str, Value, &str)] = &[
    ("rtk_connections_opened_total", Value::Counter(|r| r.snapshot.connections_opened), "WebSocket connections accepted"),
    ("rtk_connections", Value::Gauge(|r| r.snapshot.connections_active as f64), "WebSocket connections open now"),
    ("rtk_subscriptions", Value::Gauge(|r| r.snapshot.subscriptions as f64), "topic memberships (connection × topic) now"),
    ("rtk_deliveries_total", Value::Counter(|r| r.snapshot.deliveries), "frames queued to subscribers (one per subscriber per message)"),
    ("rtk_bytes_queued_total", Value::Counter(|r| r.snapshot.bytes_queued), "bytes of those frames"),
    ("rtk_bytes_written_total", Value::Counter(|r| r.snapshot.bytes_written), "bytes written to client sockets"),
    ("rtk_messages_in_total", Value::Counter(|r| r.snapshot.messages_in), "data messages received from clients"),
    ("rtk_publishes_total", Value::Counter(|r| r.snapshot.publishes), "messages published through the broker"),
    ("rtk_publish_errors_total", Value::Counter(|r| r.snapshot.publish_errors), "publishes that failed"),
    ("rtk_slow_consumer_closes_total", Value::Counter(|r| r.snapshot.slow_consumer_closes), "connections closed by the slow-consumer policy"),
    ("rtk_slow_consumer_drops_total", Value::Counter(|r| r.snapshot.slow_consumer_drops), "queued messages dropped by DropOldest / LatestPerTopic"),
    ("rtk_protocol_errors_total", Value::Counter(|r| r.snapshot.protocol_errors), "connections closed for a WebSocket protocol violation"),
    ("rtk_broker_reconnects_total", Value::Counter(|r| r.snapshot.broker_reconnects), "times the broker subscriber connection was lost or a reconnection attempt failed"),
    ("rtk_broker_oversized_drops_total", Value::Counter(|r| r.snapshot.broker_oversized_drops), "broker messages dropped because their frame exceeded the outbound queue bound"),
    ("rtk_broker_live", Value::Gauge(|r| if r.broker_live { 1.0 } else { 0.0 }), "1 while the broker connection is live"),
    ("rtk_dispatch_lag_seconds", Value::Gauge(|r| r.dispatch_lag.as_secs_f64()), "longest time from broker receipt to the end of a shard's fan-out, over the last export interval"),
    ("rtk_runtime_alive_tasks", Value::Gauge(|r| r.alive_tasks as f64), "tasks alive in the tokio runtime the service runs on"),
    ("rtk_outbound_queue_peak_bytes", Value::Gauge(|r| r.snapshot.outbound_queue_peak_bytes as f64), "most data bytes one ended connection held over its outbound bound"),
    ("rtk_recoveries_succeeded_total", Value::Counter(|r| r.snapshot.recoveries_succeeded), "subscriptions with a position that recovered every missed publication"),
    ("rtk_recoveries_failed_total", Value::Counter(|r| r.snapshot.recoveries_failed), "subscriptions with a position that could not recover (recovered: false)"),
    ("rtk_recovered_publications_total", Value::Counter(|r| r.snapshot.recovered_publications), "publications re-sent by successful recoveries"),
    ("rtk_insufficient_state_slow_consumer_total", Value::Counter(|r| r.snapshot.insufficient_state_slow_consumer), "insufficient_state sent because the slow-consumer policy dropped a positioned frame"),
    ("rtk_broker_gaps_healed_total", Value::Counter(|r| r.snapshot.broker_gaps_healed), "runs of skipped offsets of a positioned topic read back from the Redis stream and delivered in order"),
    ("rtk_insufficient_state_broker_gap_total", Value::Counter(|r| r.snapshot.insufficient_state_broker_gap), "insufficient_state sent because a positioned topic's publications from Redis skipped offsets or changed epoch"),
    ("rtk_unpositioned_publishes_total", Value::Counter(|r| r.snapshot.unpositioned_publishes), "publications without a position while topic policies are configured"),
    ("rtk_broker_history_reads_total", Value::Counter(|r| r.snapshot.broker_history_reads), "ranges of positioned topics read from the Redis stream (one per range, however many recoveries share it)"),
];

/// Reports the current values to the process's `metrics` recorder (a no-op without one).
pub(crate) fn export(m: &Metrics, labels: &[metrics::Label], broker_live: bool) {
    let reading = Reading {
        snapshot: m.snapshot(),
        dispatch_lag: m.take_dispatch_lag_max(),
        alive_tasks: tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_alive_tasks())
            .unwrap_or_default(),
        broker_live,
    };
    for &(name, ref value, help) in METRICS {
        match value {
            Value::Counter(read) => {
                metrics::describe_counter!(name, help);
                metrics::counter!(name, labels.iter()).absolute(read(&reading));
            }
            Value::Gauge(read) => {
                metrics::describe_gauge!(name, help);
                metrics::gauge!(name, labels.iter()).set(read(&reading));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_reported_metric_is_documented_in_the_crate_docs() {
        let docs = include_str!("lib.rs");
        for (name, value, _) in super::METRICS {
            let row = format!("| `{name}` | {} |", value.kind());
            assert!(docs.contains(&row), "lib.rs docs lack the row for {name}");
        }
    }
}
