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
use bytes::Bytes;
use smallvec::SmallVec;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::deflate::PublicationFrames;
use crate::frame;
use crate::metrics::Metrics;
use crate::outbound::{
    Conn, Delivered, DirectGate, NO_TOPIC, POSITIONED, Push, TopicKey, WriteTally,
};
use crate::routes::Expected;
use crate::shrink::ShrinkWhenSparse;
use crate::wire::{self, Format, Frames};

/// Commands a shard applies in arrival order.
#[derive(Debug)]
pub(crate) enum Command {
    /// Add `conn` to `topic`, unless it is already in `max_topics` other topics; `done` fires
    /// once the subscription is in the map (`true`) or was refused for the limit (`false`).
    /// Counting here, where each connection's topics are known and commands apply one at a
    /// time, keeps the limit exact under concurrent joins and leaves.
    ///
    /// `prelude` is queued to the connection just before it joins (an `rtk1` connection's
    /// `subscribed` message and the publications it recovered), so it precedes every later
    /// delivery of the topic; `positioned` says the topic has history (a dropped prelude
    /// frame must then be reported, as a dropped delivery would). `expected` keeps the topic's
    /// publications coming to every shard until this one is applied (see
    /// [`Routes`](crate::routes::Routes)).
    Subscribe {
        conn: Arc<Conn>,
        topic: Arc<str>,
        max_topics: usize,
        done: oneshot::Sender<bool>,
        prelude: Vec<Bytes>,
        positioned: bool,
        expected: Option<Expected>,
    },
    /// Remove the connection from one topic.
    Unsubscribe { conn_id: Uuid, topic: Arc<str> },
    /// Remove the connection from every topic it joined.
    Remove { conn_id: Uuid },
    /// Push a publication to every local subscriber of `topic`, each in its format.
    Deliver {
        topic: Arc<str>,
        frames: Frames,
        /// When the broker handed the message over, for the dispatch-lag gauge.
        since: Instant,
    },
    /// The positioned `topic`'s publications skipped some (the broker lost them): every `rtk1`
    /// subscriber gets `insufficient_state` and leaves the topic, never a silent gap.
    Lost { topic: Arc<str> },
    /// A presence event (`join`/`leave`) of `topic`: to its `rtk1` subscribers only; the
    /// others receive exactly the publications.
    Presence { topic: Arc<str>, frame: Bytes },
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

/// A topic's subscribers in one shard. The first is kept in the map's own slot: a topic with one
/// subscriber (a per-user channel) costs no allocation, and a delivery to it one cache miss fewer.
type Subscribers = SmallVec<[Arc<Conn>; 1]>;

pub(crate) struct Shard {
    /// Subscribers per topic. Owned by the shard task: no lock.
    topics: AHashMap<Arc<str>, Subscribers>,
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
        self.topics.get(topic).map(|subs| subs.as_slice())
    }

    /// How many topics have at least one subscriber here.
    #[cfg(feature = "__bench_api")]
    pub(crate) fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// Delivers `run`, consecutive publications of `topic` taken from the channel together,
    /// the oldest handed over by the broker at `since`: while the [`DirectGate`] allows direct
    /// writes one by one, as if each had come alone; otherwise (the shard is busy) as one run
    /// ([`deliver_run`](Self::deliver_run)). Leaves `run` empty.
    fn apply_run(&mut self, topic: &Arc<str>, run: &mut Vec<Frames>, since: Instant) {
        let now = Instant::now();
        // A run queued together batches whatever the fan-out: only an open gate splits it.
        if self.gate.allows(now, since, usize::MAX) {
            for frames in run.drain(..) {
                self.deliver_one(topic, &frames, since);
            }
            return;
        }
        let done = self.deliver_run(topic, run);
        run.clear();
        let end = Instant::now();
        self.gate.record(done, end.saturating_duration_since(now));
        self.metrics
            .dispatch_lag(end.saturating_duration_since(since));
    }

    /// Delivers one publication of `topic`, handed over by the broker at `since`: written
    /// directly where the [`DirectGate`] allows it, queued otherwise.
    fn deliver_one(&mut self, topic: &str, frames: &Frames, since: Instant) {
        let now = Instant::now();
        let done = self.deliver_with(topic, frames, |gate, subscribers| {
            gate.allows(now, since, subscribers).then_some(now)
        });
        let end = Instant::now();
        self.gate.record(done, end.saturating_duration_since(now));
        self.metrics
            .dispatch_lag(end.saturating_duration_since(since));
    }

    pub(crate) fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Lost { topic } => {
                let lost: Vec<Uuid> = self
                    .topics
                    .get(&topic)
                    .map(|subs| {
                        subs.iter()
                            .filter(|c| c.format == Format::Rtk1)
                            .map(|c| {
                                c.push_control(wire::rtk1_insufficient_state(&topic));
                                c.id
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                for conn_id in lost {
                    self.metrics.insufficient_state_broker();
                    self.apply(Command::Unsubscribe {
                        conn_id,
                        topic: topic.clone(),
                    });
                }
            }
            Command::Presence { topic, frame } => {
                for conn in self.topics.get(&topic).into_iter().flatten() {
                    if conn.format == Format::Rtk1
                        && conn.push(frame.clone(), NO_TOPIC) == Push::Overflow
                    {
                        self.metrics.add_slow_consumers(1);
                    }
                }
            }
            Command::Deliver {
                topic,
                frames,
                since,
            } => self.deliver_one(&topic, &frames, since),
            Command::Subscribe {
                conn,
                topic,
                max_topics,
                done,
                prelude,
                positioned,
                expected,
            } => {
                let allowed = self.conns.get(&conn.id).is_none_or(|(_, joined)| {
                    joined.len() < max_topics || joined.iter().any(|(t, _)| *t == topic)
                });
                if allowed && self.subscribe(conn.clone(), topic.clone()) {
                    self.queue_prelude(&conn, &topic, prelude, positioned);
                }
                // Applied: the shard's own route is set (if it kept the subscriber) before this
                // lets the topic's publications go to its routes only.
                drop(expected);
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

    /// Adds `conn` to `topic`; `false` if it was already in it or is ending.
    pub(crate) fn subscribe(&mut self, conn: Arc<Conn>, topic: Arc<str>) -> bool {
        if conn.is_ending() {
            // Its `Remove` may already have been applied: adding it now would leak the entry.
            return false;
        }
        let entry = self
            .conns
            .entry(conn.id)
            // One topic is the usual case: room for one, not the four a first push reserves.
            .or_insert_with(|| (conn.clone(), Vec::with_capacity(1)));
        if entry.1.iter().any(|(t, _)| *t == topic) {
            return false;
        }
        let subs = self.topics.entry(topic.clone()).or_default();
        entry.1.push((topic.clone(), subs.len()));
        self.metrics.subscribed();
        subs.push(conn);
        if subs.len() == 1 {
            self.interest.first_in_shard(&topic);
        }
        true
    }

    /// Queues a joining connection's prelude (see [`Command::Subscribe`]) under the topic's
    /// key, so a policy that drops it reports the topic like any delivery of it.
    fn queue_prelude(&mut self, conn: &Arc<Conn>, topic: &str, prelude: Vec<Bytes>, pos: bool) {
        let Some((key, _)) = self.topics.get_key_value(topic) else {
            return;
        };
        let key = topic_key(key, pos && conn.format == Format::Rtk1);
        let mut dropped = false;
        for frame in prelude {
            match conn.push(frame, key) {
                Push::QueuedDropping(n) => {
                    dropped = true;
                    self.metrics.add_slow_consumer_drops(n);
                }
                Push::Overflow => self.metrics.add_slow_consumers(1),
                _ => {}
            }
        }
        if dropped {
            self.report_lost(conn);
        }
    }

    /// Tells `conn` (an `rtk1` connection whose queue dropped frames) which positioned topics
    /// it lost publications of, and takes it out of them: `insufficient_state` means "you are
    /// no longer subscribed to this topic; subscribe again with your position". The notice
    /// goes ahead of queued data, so a policy dropping more cannot drop it.
    fn report_lost(&mut self, conn: &Arc<Conn>) {
        let lost = conn.take_lost();
        if lost.is_empty() {
            return;
        }
        let Some((_, joined)) = self.conns.get(&conn.id) else {
            return;
        };
        let topics: Vec<Arc<str>> = joined
            .iter()
            .filter(|(t, _)| {
                self.topics
                    .get_key_value(t.as_ref())
                    .is_some_and(|(k, _)| lost.contains(&topic_key(k, true)))
            })
            .map(|(t, _)| t.clone())
            .collect();
        for topic in topics {
            conn.push_control(wire::rtk1_insufficient_state(&topic));
            self.metrics.insufficient_state_slow();
            self.apply(Command::Unsubscribe {
                conn_id: conn.id,
                topic,
            });
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

    /// [`deliver_frames`](Self::deliver_frames) of one verbatim frame (the benches' entry).
    #[cfg(any(test, feature = "__bench_api"))]
    pub(crate) fn deliver(
        &mut self,
        topic: &str,
        frames: &PublicationFrames,
        direct: Option<Instant>,
    ) -> Delivered {
        self.deliver_frames(topic, &Frames::verbatim(frames.clone()), direct)
    }

    /// The hot path: per subscriber, the frame of its format ([`Frames::for_format`]), one
    /// refcount and one queue push, or with `direct` (the time now) one non-blocking write when
    /// the connection's writer is idle ([`Conn::push_or_write`]). No await; no allocation
    /// unless a policy dropped a positioned frame (then `insufficient_state`, see
    /// [`report_lost`](Self::report_lost)). An `rtk1` subscriber that joined after the
    /// publication was framed for verbatim subscribers only gets an envelope framed here, once
    /// for all of them.
    pub(crate) fn deliver_frames(
        &mut self,
        topic: &str,
        frames: &Frames,
        direct: Option<Instant>,
    ) -> Delivered {
        self.deliver_with(topic, frames, |_, _| direct)
    }

    /// [`deliver_frames`](Self::deliver_frames), where `direct` decides from the gate and the
    /// number of subscribers found whether (and with which time) frames are written directly.
    fn deliver_with(
        &mut self,
        topic: &str,
        frames: &Frames,
        direct: impl FnOnce(&mut DirectGate, usize) -> Option<Instant>,
    ) -> Delivered {
        let Some((key, subs)) = self.topics.get_key_value(topic) else {
            return Delivered::default();
        };
        let direct = direct(&mut self.gate, subs.len());
        let mut late = None;
        let mut counts = Counts::default();
        let mut lost: Vec<Arc<Conn>> = Vec::new();
        let mut tally = WriteTally::default();
        for conn in subs {
            let (frame, topic_key) = frame_for(conn, key, frames, &mut late);
            let len = frame.len();
            let pushed = match direct {
                Some(now) => conn.push_or_write(frame, topic_key, now, &mut tally),
                None => conn.push(frame, topic_key),
            };
            if counts.add(pushed, len) && conn.format == Format::Rtk1 {
                lost.push(conn.clone());
            }
        }
        self.report(counts, tally, &lost)
    }

    /// [`deliver_frames`](Self::deliver_frames) for consecutive publications of `topic` that
    /// waited in the shard's channel together (the shard is behind): every subscriber gets
    /// them all, in order, queued under one lock ([`Conn::push_all`]), and its writer batches
    /// them. Per subscriber, the lock, its state brought into the cache and the writer's
    /// wake-up are paid once per run instead of once per publication.
    pub(crate) fn deliver_run(&mut self, topic: &str, run: &[Frames]) -> Delivered {
        let Some((key, subs)) = self.topics.get_key_value(topic) else {
            return Delivered::default();
        };
        // Per publication, the `rtk1` envelope framed here, if any (see `frame_for`).
        let mut late: Vec<Option<PublicationFrames>> = vec![None; run.len()];
        let mut counts = Counts::default();
        let mut lost: Vec<Arc<Conn>> = Vec::new();
        for conn in subs {
            let mut lost_one = false;
            let frames = (run.iter().zip(&mut late)).map(|(f, late)| frame_for(conn, key, f, late));
            conn.push_all(frames, |pushed, len| lost_one |= counts.add(pushed, len));
            if lost_one && conn.format == Format::Rtk1 {
                lost.push(conn.clone());
            }
        }
        self.report(counts, WriteTally::default(), &lost)
    }

    /// Reports what a delivery did to the metrics, and tells the connections in `lost` which
    /// positioned frames they lost.
    fn report(&mut self, counts: Counts, tally: WriteTally, lost: &[Arc<Conn>]) -> Delivered {
        for conn in lost {
            self.report_lost(conn);
        }
        self.metrics.add_deliveries(counts.delivered, counts.bytes);
        tally.report(&self.metrics);
        if counts.overflowed > 0 {
            self.metrics.add_slow_consumers(counts.overflowed);
        }
        if counts.dropped > 0 {
            self.metrics.add_slow_consumer_drops(counts.dropped);
        }
        Delivered {
            total: counts.delivered,
            direct: counts.direct,
        }
    }
}

/// What a delivery did, frame by frame.
#[derive(Debug, Default)]
struct Counts {
    delivered: u64,
    bytes: u64,
    direct: u64,
    overflowed: u64,
    dropped: u64,
}

impl Counts {
    /// Counts a frame of `len` bytes that went as `pushed`; whether a slow-consumer policy
    /// dropped frames to make room for it.
    fn add(&mut self, pushed: Push, len: usize) -> bool {
        match pushed {
            Push::Queued => self.delivered += 1,
            Push::Written => {
                self.delivered += 1;
                self.direct += 1;
            }
            Push::QueuedDropping(n) => {
                self.delivered += 1;
                self.dropped += n;
            }
            Push::Overflow => self.overflowed += 1,
            Push::Closed => {}
        }
        if matches!(
            pushed,
            Push::Queued | Push::Written | Push::QueuedDropping(_)
        ) {
            self.bytes += len as u64;
        }
        matches!(pushed, Push::QueuedDropping(_))
    }
}

/// What `conn` gets of the publication `frames` of the topic interned as `key`: the frame of
/// its format ([`Frames::for_format`]), plain or the publication's one compressed frame
/// (invariant 2), and the key it is queued under. An `rtk1` subscriber that joined after the
/// publication was framed for verbatim subscribers only gets the envelope framed into `late`,
/// once for all of them.
fn frame_for(
    conn: &Conn,
    key: &Arc<str>,
    frames: &Frames,
    late: &mut Option<PublicationFrames>,
) -> (Bytes, TopicKey) {
    let formatted = match frames.for_format(conn.format) {
        Some(formatted) => formatted,
        None => late.get_or_insert_with(|| late_envelope(key, frames)),
    };
    // The interned name's address identifies the topic for conflation.
    let topic_key = topic_key(key, conn.format == Format::Rtk1 && frames.positioned);
    (formatted.for_subscriber(conn.deflate()).clone(), topic_key)
}

/// The `rtk1` envelope, without a position, of a publication framed for verbatim subscribers
/// only: for an `rtk1` subscriber that joined after it was framed.
fn late_envelope(topic: &str, frames: &Frames) -> PublicationFrames {
    let payload = frame::encoded_payload(frames.verbatim.plain());
    PublicationFrames::new(wire::rtk1_pub(topic, None, payload.unwrap_or_default()))
}

/// The key a frame of the topic interned as `name` is queued under: its address, with
/// [`POSITIONED`] for a frame whose loss the client must be told about.
fn topic_key(name: &Arc<str>, positioned: bool) -> TopicKey {
    let key = Arc::as_ptr(name) as *const u8 as TopicKey;
    debug_assert_eq!(key & POSITIONED, 0, "an Arc's data is aligned");
    if positioned { key | POSITIONED } else { key }
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
        let mut run = Vec::new();
        // Commands are taken in batches so one wake-up serves many deliveries; consecutive
        // deliveries of one topic go out together ([`Shard::deliver_run`]).
        while rx.recv_many(&mut batch, 256).await > 0 {
            let mut cmds = batch.drain(..).peekable();
            while let Some(cmd) = cmds.next() {
                let Command::Deliver {
                    topic,
                    frames,
                    since,
                } = cmd
                else {
                    shard.apply(cmd);
                    continue;
                };
                let same_topic =
                    |c: &Command| matches!(c, Command::Deliver { topic: t, .. } if *t == topic);
                if !cmds.peek().is_some_and(same_topic) {
                    shard.deliver_one(&topic, &frames, since);
                    continue;
                }
                run.push(frames);
                while let Some(Command::Deliver { frames, .. }) = cmds.next_if(same_topic) {
                    run.push(frames);
                }
                shard.apply_run(&topic, &mut run, since);
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

    /// A run of publications reaches every subscriber whole and in order, each in its format:
    /// an `rtk1` subscriber of publications framed for verbatim subscribers only gets envelopes
    /// framed here.
    #[test]
    fn a_run_of_publications_reaches_every_subscriber_in_order() {
        let metrics = Arc::new(Metrics::default());
        let mut shard = Shard::detached(Arc::new(Interest::default()), metrics);
        let topic: Arc<str> = Arc::from("room");
        let plain = conn(1);
        let rtk1 = Arc::new(
            Conn::new(Uuid::from_u128(2), 0, 1 << 20, SlowConsumerPolicy::Close)
                .with_format(Format::Rtk1),
        );
        shard.subscribe(plain.clone(), topic.clone());
        shard.subscribe(rtk1.clone(), topic.clone());
        let payload = |n: u64| format!("{{\"n\":{n}}}");
        let run: Vec<Frames> = (1..=3)
            .map(|n| {
                let frame = frame::encode_text(payload(n).as_bytes());
                Frames::verbatim(PublicationFrames::new(frame))
            })
            .collect();
        assert_eq!(
            shard.deliver_run("room", &run),
            Delivered {
                total: 6,
                direct: 0
            }
        );
        let taken = |conn: &Conn| {
            let mut batch = Vec::new();
            conn.take(&mut batch);
            batch
        };
        let verbatim: Vec<Bytes> = run.iter().map(|f| f.verbatim.plain().clone()).collect();
        assert_eq!(taken(&plain), verbatim);
        let envelopes: Vec<Bytes> = (1..=3)
            .map(|n| wire::rtk1_pub("room", None, payload(n).as_bytes()))
            .collect();
        assert_eq!(taken(&rtk1), envelopes);
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
