//! Shards: who is subscribed to what, and the fan-out of one frame to those subscribers.
//!
//! # Contention design
//! A connection is assigned to one shard for its whole life (`id % shards`, where ids come from a
//! counter, so shards fill evenly). Each shard is a task that **owns** its topic map outright: the
//! map is a plain `HashMap` with no lock, mutated only by that task, and reached only through the
//! shard's bounded command channel (invariant 3, docs/architecture.md). Subscribing, unsubscribing and delivering are all commands, so
//! they are applied in one order per shard, and a delivery never waits for a lock another shard or
//! a connection task could hold.
//!
//! Delivering a frame to a subscriber is [`Conn::push_or_write`]: a refcount bump on the shared
//! [`Bytes`] and a push onto that connection's queue under its own short lock or, when the
//! connection has nothing pending and is not batching, one non-blocking write of the frame to
//! its socket. Nothing on this path awaits or blocks, so a slow client can never stall a shard —
//! it meets the slow-consumer policy instead.
//!
//! # Ordering
//! Commands reach a shard over one FIFO channel, from the single
//! [`Dispatcher`](crate::dispatch::Dispatcher) task, and are applied in arrival order; each
//! delivery pushes onto FIFO queues. So all subscribers of a topic on this instance see that
//! topic's messages in the order the broker delivered them (invariant 1, docs/architecture.md).

use std::sync::Arc;
use std::time::Instant;

use ahash::AHashMap;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::deflate::PublicationFrames;
use crate::metrics::Metrics;
use crate::outbound::{Conn, Delivered, DirectGate, Push, TopicKey, WriteTally};
use crate::shrink::ShrinkWhenSparse;

/// Commands a shard applies in arrival order.
#[derive(Debug)]
pub(crate) enum Command {
    /// Add `conn` to `topic`, unless it is already in `max_topics` other topics; `done` fires
    /// once the subscription is in the map (`true`) or was refused for the limit (`false`).
    /// Counting here, where each connection's topics are known and commands apply one at a
    /// time, keeps the limit exact under concurrent joins and leaves.
    Subscribe {
        conn: Arc<Conn>,
        topic: Arc<str>,
        max_topics: usize,
        done: oneshot::Sender<bool>,
    },
    /// Remove the connection from one topic.
    Unsubscribe { conn_id: Uuid, topic: Arc<str> },
    /// Remove the connection from every topic it joined.
    Remove { conn_id: Uuid },
    /// Push an encoded frame to every local subscriber of `topic`.
    Deliver {
        topic: Arc<str>,
        frames: PublicationFrames,
        /// When the broker handed the message over, for the dispatch-lag gauge.
        since: Instant,
    },
    /// Queue a close frame (after pending data) for every connection; `done` fires when queued.
    CloseAll {
        code: u16,
        reason: &'static str,
        done: oneshot::Sender<()>,
    },
}

/// Told when a topic gains its first or loses its last subscriber *in one shard*, so the broker
/// can keep one subscription per instance. Called off the dispatch path only.
pub(crate) trait TopicInterest: Send + Sync + 'static {
    fn first_in_shard(&self, topic: &Arc<str>);
    fn last_in_shard(&self, topic: &Arc<str>);
}

/// A topic a connection joined, and the connection's index in that topic's subscriber list, so
/// leaving is O(1) however many share the topic.
type Joined = (Arc<str>, usize);

pub(crate) struct Shard {
    /// Subscribers per topic. Owned by the shard task: no lock.
    topics: AHashMap<Arc<str>, Vec<Arc<Conn>>>,
    /// Every connection that joined a topic here, with the topics it joined.
    conns: AHashMap<Uuid, (Arc<Conn>, Vec<Joined>)>,
    interest: Arc<dyn TopicInterest>,
    metrics: Arc<Metrics>,
    gate: DirectGate,
}

impl Shard {
    /// A shard with an empty map and no task or channel, for driving directly (`bench_api`).
    pub(crate) fn detached(interest: Arc<dyn TopicInterest>, metrics: Arc<Metrics>) -> Self {
        Self {
            topics: AHashMap::new(),
            conns: AHashMap::new(),
            interest,
            metrics,
            gate: DirectGate::new(Instant::now()),
        }
    }

    /// The local subscribers of `topic`: the lookup `deliver` starts with.
    #[cfg(any(test, feature = "__bench_api"))]
    pub(crate) fn subscribers(&self, topic: &str) -> Option<&[Arc<Conn>]> {
        self.topics.get(topic).map(Vec::as_slice)
    }

    /// How many topics have at least one subscriber here.
    #[cfg(feature = "__bench_api")]
    pub(crate) fn topic_count(&self) -> usize {
        self.topics.len()
    }

    pub(crate) fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Deliver {
                topic,
                frames,
                since,
            } => {
                let now = Instant::now();
                let direct = self.gate.allows(now, since);
                let done = self.deliver(&topic, &frames, direct.then_some(now));
                let end = Instant::now();
                self.gate.record(done, end.saturating_duration_since(now));
                self.metrics
                    .dispatch_lag(end.saturating_duration_since(since));
            }
            Command::Subscribe {
                conn,
                topic,
                max_topics,
                done,
            } => {
                let allowed = self.conns.get(&conn.id).is_none_or(|(_, joined)| {
                    joined.len() < max_topics || joined.iter().any(|(t, _)| *t == topic)
                });
                if allowed {
                    self.subscribe(conn, topic);
                }
                let _ = done.send(allowed);
            }
            Command::Unsubscribe { conn_id, topic } => {
                if let Some((_, joined)) = self.conns.get_mut(&conn_id) {
                    if let Some(i) = joined.iter().position(|(t, _)| *t == topic) {
                        let (_, index) = joined.swap_remove(i);
                        self.unsubscribe(conn_id, &topic, index);
                    }
                }
            }
            Command::Remove { conn_id } => {
                if let Some((_, joined)) = self.conns.remove(&conn_id) {
                    for (topic, index) in joined {
                        self.unsubscribe(conn_id, &topic, index);
                    }
                    self.conns.shrink_when_sparse();
                }
            }
            Command::CloseAll { code, reason, done } => {
                for (conn, _) in self.conns.values() {
                    conn.close(code, reason, true);
                }
                let _ = done.send(());
            }
        }
    }

    pub(crate) fn subscribe(&mut self, conn: Arc<Conn>, topic: Arc<str>) {
        if conn.is_ending() {
            // Its `Remove` may already have been applied: adding it now would leak the entry.
            return;
        }
        let entry = self
            .conns
            .entry(conn.id)
            // One topic is the usual case: room for one, not the four a first push reserves.
            .or_insert_with(|| (conn.clone(), Vec::with_capacity(1)));
        if entry.1.iter().any(|(t, _)| *t == topic) {
            return;
        }
        let subs = self.topics.entry(topic.clone()).or_default();
        entry.1.push((topic.clone(), subs.len()));
        self.metrics.subscribed();
        subs.push(conn);
        if subs.len() == 1 {
            self.interest.first_in_shard(&topic);
        }
    }

    /// Removes `conn_id` from `topic`'s subscribers, where it sits at `index`. The last
    /// subscriber moves into its place, and its recorded index is updated.
    fn unsubscribe(&mut self, conn_id: Uuid, topic: &Arc<str>, index: usize) {
        let Some(subs) = self.topics.get_mut(topic) else {
            return;
        };
        // The index is kept exact by `subscribe` and by the update below; the search is a
        // safety net that keeps the map right should it ever not be.
        let index = if subs.get(index).is_some_and(|c| c.id == conn_id) {
            Some(index)
        } else {
            debug_assert!(false, "stale subscriber index for {conn_id} in {topic}");
            subs.iter().position(|c| c.id == conn_id)
        };
        if let Some(index) = index {
            subs.swap_remove(index);
            self.metrics.unsubscribed();
            if let Some(moved) = subs.get(index) {
                if let Some((_, joined)) = self.conns.get_mut(&moved.id) {
                    if let Some(entry) = joined.iter_mut().find(|(t, _)| t == topic) {
                        entry.1 = index;
                    }
                }
            }
        }
        if subs.is_empty() {
            self.topics.remove(topic);
            self.topics.shrink_when_sparse();
            self.interest.last_in_shard(topic);
        } else {
            subs.shrink_when_sparse();
        }
    }

    /// The hot path: per subscriber, one refcount and one queue push, or with `direct` (the time
    /// now) one non-blocking write when the connection's writer is idle
    /// ([`Conn::push_or_write`]). No await, no allocation.
    pub(crate) fn deliver(
        &mut self,
        topic: &str,
        frames: &PublicationFrames,
        direct: Option<Instant>,
    ) -> Delivered {
        let Some((key, subs)) = self.topics.get_key_value(topic) else {
            return Delivered::default();
        };
        // The interned name's address identifies the topic for conflation.
        let topic_key = Arc::as_ptr(key) as *const u8 as TopicKey;
        let mut delivered = 0u64;
        let mut overflowed = 0u64;
        let mut dropped = 0u64;
        let mut tally = WriteTally::default();
        let mut direct_writes = 0u64;
        let mut bytes = 0u64;
        for conn in subs {
            // The plain frame, or the publication's one compressed frame (invariant 2).
            let frame = frames.for_subscriber(conn.deflate());
            let len = frame.len() as u64;
            let pushed = match direct {
                Some(now) => conn.push_or_write(frame.clone(), topic_key, now, &mut tally),
                None => conn.push(frame.clone(), topic_key),
            };
            match pushed {
                Push::Queued => {
                    delivered += 1;
                    bytes += len;
                }
                Push::Written => {
                    delivered += 1;
                    bytes += len;
                    direct_writes += 1;
                }
                Push::QueuedDropping(n) => {
                    delivered += 1;
                    bytes += len;
                    dropped += n;
                }
                Push::Overflow => overflowed += 1,
                Push::Closed => {}
            }
        }
        self.metrics.add_deliveries(delivered, bytes);
        tally.report(&self.metrics);
        if overflowed > 0 {
            self.metrics.add_slow_consumers(overflowed);
        }
        if dropped > 0 {
            self.metrics.add_slow_consumer_drops(dropped);
        }
        Delivered {
            total: delivered,
            direct: direct_writes,
        }
    }
}

/// Starts one shard task and returns the sender of its command channel.
pub(crate) fn spawn_shard(
    capacity: usize,
    interest: Arc<dyn TopicInterest>,
    metrics: Arc<Metrics>,
) -> mpsc::Sender<Command> {
    let (tx, mut rx) = mpsc::channel::<Command>(capacity);
    let mut shard = Shard::detached(interest, metrics);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(256);
        // Commands are taken in batches so one wake-up serves many deliveries.
        while rx.recv_many(&mut batch, 256).await > 0 {
            for cmd in batch.drain(..) {
                shard.apply(cmd);
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::SlowConsumerPolicy;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;

    /// Records the broker-interest calls, to check they follow the subscriber counts.
    #[derive(Default)]
    struct Interest(Mutex<Vec<(bool, String)>>);

    impl TopicInterest for Interest {
        fn first_in_shard(&self, topic: &Arc<str>) {
            self.0.lock().unwrap().push((true, topic.to_string()));
        }
        fn last_in_shard(&self, topic: &Arc<str>) {
            self.0.lock().unwrap().push((false, topic.to_string()));
        }
    }

    fn conn(id: u128) -> Arc<Conn> {
        Arc::new(Conn::new(
            Uuid::from_u128(id),
            0,
            1 << 20,
            SlowConsumerPolicy::Close,
        ))
    }

    /// Random joins, leaves and removals against a plain model: after every step each topic's
    /// subscribers are exactly the model's, and every recorded index points at its connection.
    #[test]
    fn indexes_stay_exact_under_random_joins_and_leaves() {
        let interest = Arc::new(Interest::default());
        let metrics = Arc::new(Metrics::default());
        let mut shard = Shard::detached(interest.clone(), metrics.clone());
        let conns: Vec<Arc<Conn>> = (0..40).map(conn).collect();
        let topics: Vec<Arc<str>> = (0..5).map(|t| Arc::from(format!("t{t}"))).collect();
        let mut model: BTreeMap<usize, BTreeSet<u128>> = BTreeMap::new();
        // xorshift: deterministic, no dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound as u64) as usize
        };
        for _ in 0..20_000 {
            let c = next(conns.len());
            let t = next(topics.len());
            match next(10) {
                0..=5 => {
                    shard.subscribe(conns[c].clone(), topics[t].clone());
                    model.entry(t).or_default().insert(c as u128);
                }
                6..=8 => {
                    shard.apply(Command::Unsubscribe {
                        conn_id: conns[c].id,
                        topic: topics[t].clone(),
                    });
                    model.entry(t).or_default().remove(&(c as u128));
                }
                _ => {
                    shard.apply(Command::Remove {
                        conn_id: conns[c].id,
                    });
                    for subs in model.values_mut() {
                        subs.remove(&(c as u128));
                    }
                }
            }
            for (t, topic) in topics.iter().enumerate() {
                let want = model.get(&t).cloned().unwrap_or_default();
                let got: BTreeSet<u128> = shard
                    .subscribers(topic)
                    .unwrap_or(&[])
                    .iter()
                    .map(|c| c.id.as_u128())
                    .collect();
                assert_eq!(got, want, "subscribers of {topic}");
            }
            for (id, (_, joined)) in &shard.conns {
                for (topic, index) in joined {
                    assert_eq!(
                        shard.topics[topic][*index].id, *id,
                        "index of {id} in {topic}"
                    );
                }
            }
        }
        let subscribed: usize = model.values().map(BTreeSet::len).sum();
        assert_eq!(metrics.snapshot().subscriptions, subscribed as u64);
        // Interest calls alternate per topic, first then last, and end where the topic is.
        let calls = interest.0.lock().unwrap();
        for (t, topic) in topics.iter().enumerate() {
            let seq: Vec<bool> = calls
                .iter()
                .filter(|(_, name)| name.as_str() == topic.as_ref())
                .map(|(first, _)| *first)
                .collect();
            assert!(seq.iter().step_by(2).all(|&f| f), "{topic}: {seq:?}");
            assert!(
                seq.iter().skip(1).step_by(2).all(|&f| !f),
                "{topic}: {seq:?}"
            );
            let live = !model.get(&t).is_none_or(BTreeSet::is_empty);
            assert_eq!(seq.len() % 2 == 1, live, "{topic}");
        }
    }
}
