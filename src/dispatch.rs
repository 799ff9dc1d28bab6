//! The dispatcher: the task between the broker and the shards.
//!
//! The broker hands over each message it receives as a [`Published`], in its own order, through
//! one bounded channel. The [`Dispatcher`] frames the payload once — a WebSocket text frame in
//! shared [`Bytes`], or a binary frame for a payload that is not UTF-8 (any program may publish
//! on the instances' Redis channels, and a browser fails a connection on a text frame that is not
//! UTF-8) — and sends that frame to each shard holding the topic ([`Routes`]) over that shard's
//! FIFO command channel (invariant 2, encode once). A payload whose frame is larger than the
//! outbound queue bound (`outbound_queue_bytes`) could never be queued for anyone and would
//! close every subscriber it is queued for: it is dropped here, counted
//! (`broker_oversized_drops`) and logged at most once every [`OVERSIZED_LOG_EVERY`]. Being a
//! single task that awaits each send in turn, it keeps the broker's order for every shard
//! (invariant 1), and it waits only when a shard's channel is full: never on a client
//! (invariant 3).
//!
//! That framing and routing is a [`Fanout`]. A publication of a topic without a policy needs
//! nothing else, so the Redis subscriber task that receives one delivers it with a `Fanout` of
//! its own, sparing the dispatcher's wake-up; every publication of such a topic takes that way
//! ([`Routes::direct`]), so their order is kept the same way.
//!
//! # Positions and recovery
//! The dispatcher also owns the in-process history ([`Streams`]): on a topic with a policy it
//! assigns each publication the next offset, frames it once per format ([`Frames`]), keeps the
//! frames and hands them on, all in one step of one task, so offsets follow the delivery order
//! exactly. A connection speaking `rtk1` joins a topic through the dispatcher
//! ([`Request::Join`]): it reads the missed publications from the history and sends the shard
//! one subscribe that carries them, behind every delivery it already sent and ahead of every
//! later one. The shard queues them, then adds the connection to the topic: the seam between
//! history and live has no gap and no duplicate, with nothing to buffer or merge.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::deflate::PublicationFrames;
use crate::frame;
use crate::history::{HistoryPage, Observed, Position, RecoveryLimits, Streams};
use crate::metrics::Metrics;
use crate::outbound::Conn;
use crate::routes::{self, Routes};
use crate::shard::Command;
use crate::wire::{self, Frames};

/// How often publications past their TTL and forgotten epochs are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Most one warning about dropped oversized payloads per this long.
pub(crate) const OVERSIZED_LOG_EVERY: Duration = Duration::from_secs(10);

/// One message as the broker delivered it: the topic and the payload to send verbatim.
#[derive(Debug)]
pub(crate) struct Published {
    pub(crate) topic: Arc<str>,
    pub(crate) payload: Bytes,
    /// When the broker received it.
    pub(crate) since: Instant,
    /// The position the broker assigned (Redis), if any.
    pub(crate) position: Option<Position>,
    /// Told the publication's position (`None` on a topic without history).
    pub(crate) reply: Option<oneshot::Sender<Option<Position>>>,
}

/// Reads the publications `from ..= to` of a topic back from the shared store (Redis): the
/// stream's epoch there and the `(offset, payload)` pairs.
#[derive(Clone)]
pub(crate) struct Fetch(pub(crate) Arc<dyn Fn(Arc<str>, u64, u64) -> FetchFuture + Send + Sync>);

/// The future of one [`Fetch`].
pub(crate) type FetchFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Fetched, String>> + Send>>;

impl std::fmt::Debug for Fetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fetch")
    }
}

/// Ends a topic's epoch in the shared store if it is still the given one, so that the next
/// publication starts a new epoch (called when the stream went back, see
/// [`Streams::rolls_back`]); it runs in the background.
#[derive(Clone)]
pub(crate) struct EndEpoch(pub(crate) Arc<dyn Fn(Arc<str>, String) + Send + Sync>);

impl std::fmt::Debug for EndEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndEpoch")
    }
}

/// What a [`Fetch`] read: the epoch and the publications.
pub(crate) type Fetched = (String, Vec<(u64, Bytes)>);

/// A join waiting for the head of its recovery to be read from the shared store.
#[derive(Debug)]
struct Waiting {
    conn: Arc<Conn>,
    since: (String, u64),
    max_topics: usize,
    done: oneshot::Sender<bool>,
}

/// Longest a join whose position is past what this instance has received (the client came
/// from an instance further ahead) waits for this one to catch up before it is refused.
const AHEAD_WAIT: Duration = Duration::from_secs(3);

/// Most publications of one topic held while its skipped offsets are read back.
const HEAL_HOLD: usize = 10_000;

/// A topic whose skipped offsets `from ..= to` are being read back.
#[derive(Debug)]
struct Healing {
    from: u64,
    to: u64,
    held: Vec<Published>,
}

/// One read from the shared store: topic, first and last offset.
type ReadKey = (Arc<str>, u64, u64);

/// A read and what it got.
type ReadDone = (ReadKey, Result<Fetched, String>);

/// What connections and the service ask the dispatcher, the owner of the history.
#[derive(Debug)]
pub(crate) enum Request {
    /// Subscribe an `rtk1` connection to `topic`, recovering from `since` (an epoch and the
    /// last offset the client has) if given: the shard gets the `subscribed` message and the
    /// recovered publications with the subscription. `done` as in `Command::Subscribe`.
    Join {
        conn: Arc<Conn>,
        topic: Arc<str>,
        since: Option<(String, u64)>,
        max_topics: usize,
        done: oneshot::Sender<bool>,
    },
    /// The stream's top.
    Top {
        topic: Arc<str>,
        reply: oneshot::Sender<Option<Position>>,
    },
    /// A page of history.
    Page {
        topic: Arc<str>,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
        reply: oneshot::Sender<Option<HistoryPage>>,
    },
    /// Forget a stream.
    Remove {
        topic: Arc<str>,
        reply: oneshot::Sender<bool>,
    },
}

/// Frames each publication once and hands the frame to the shards holding its topic: all that
/// delivering a publication of a topic without a policy takes. The dispatcher holds one, and so
/// does each Redis subscriber task, which delivers such publications itself instead of handing
/// each to the dispatcher ([`Routes::direct`]): one task wake-up less per publication.
#[derive(Debug, Clone)]
pub(crate) struct Fanout {
    shards: Arc<[mpsc::Sender<Command>]>,
    /// Which shards hold each topic: a publication goes to those only.
    routes: Arc<Routes>,
    /// The frame of the previous payload: an identical payload published again (to the same or
    /// another topic) reuses it instead of encoding it again. The payload is compared with the
    /// frame's own copy of it, so no slice of the broker's read buffer is kept: one would keep
    /// the whole buffer (64 KiB) allocated for as long as the frame is cached.
    last: Option<PublicationFrames>,
    /// Largest frame a connection's outbound queue can hold (`outbound_queue_bytes`).
    max_frame: usize,
    metrics: Arc<Metrics>,
    /// Oversized payloads dropped since the last warning, and when that was.
    oversized: (u64, Option<Instant>),
    /// Connections speaking `rtk1` now: while there are none, topics without history are
    /// framed verbatim only.
    rtk1_conns: Arc<AtomicUsize>,
    /// Some topics may have a policy: a publication without a position is counted.
    policies: bool,
}

impl Fanout {
    /// Frames `payload` once (or reuses the frames of an identical previous payload, its
    /// compressed frame included): a text frame, or a binary one if the payload is not UTF-8.
    pub(crate) fn frame_for(&mut self, payload: &Bytes) -> PublicationFrames {
        if let Some(frames) = &self.last {
            if frame::encoded_payload(frames.plain()) == Some(&payload[..]) {
                return frames.clone();
            }
        }
        let frame = if std::str::from_utf8(payload).is_ok() {
            frame::encode_text(payload)
        } else {
            frame::encode(frame::OpCode::Binary, payload)
        };
        let frames = PublicationFrames::new(frame);
        self.last = Some(frames.clone());
        frames
    }

    /// Whether a payload of `len` bytes fits in an outbound queue; one that does not is counted
    /// and warned about, at most once per [`OVERSIZED_LOG_EVERY`].
    fn fits(&mut self, topic: &str, len: usize) -> bool {
        if frame_len(len) <= self.max_frame {
            return true;
        }
        self.metrics.broker_oversized_drop();
        self.oversized.0 += 1;
        let now = Instant::now();
        if self
            .oversized
            .1
            .is_none_or(|at| now.duration_since(at) >= OVERSIZED_LOG_EVERY)
        {
            tracing::warn!(
                topic = %topic,
                bytes = len,
                max = self.max_frame,
                dropped = self.oversized.0,
                "broker payloads larger than the outbound queue bound dropped"
            );
            self.oversized = (0, Some(now));
        }
        false
    }

    /// Whether a connection speaks `rtk1`: a publication then needs its `rtk1` frame too.
    fn rtk1_wanted(&self) -> bool {
        self.rtk1_conns.load(Ordering::Relaxed) > 0
    }

    /// For a publication of `topic` that may skip the dispatcher, the shards to send it to
    /// (see [`Routes::direct`]).
    pub(crate) fn direct(&self, topic: &str) -> Option<u64> {
        self.routes.direct(topic)
    }

    /// Frames a publication of a topic without a policy and sends it to `shards` (from
    /// [`direct`](Self::direct)), in order; returns how long it waited for full shard
    /// channels.
    pub(crate) async fn deliver(
        &mut self,
        topic: Arc<str>,
        payload: &Bytes,
        since: Instant,
        shards: u64,
    ) -> Duration {
        // Counted as the dispatcher counts them, whether or not a subscriber is here.
        if !self.fits(&topic, payload.len()) {
            return Duration::ZERO;
        }
        if self.policies {
            self.metrics.unpositioned_publish();
        }
        if shards == 0 {
            return Duration::ZERO;
        }
        let frames = self.frames(&topic, None, payload);
        self.send(&topic, &frames, since, false, shards).await
    }

    /// A publication at `position` (if it has one) framed in every format needed: verbatim,
    /// and `rtk1` if it has a position or a connection speaks `rtk1`.
    fn frames(&mut self, topic: &str, position: Option<&Position>, payload: &Bytes) -> Frames {
        let rtk1 = (position.is_some() || self.rtk1_wanted())
            .then(|| PublicationFrames::new(wire::rtk1_pub(topic, position, payload)));
        Frames {
            verbatim: self.frame_for(payload),
            rtk1,
            positioned: position.is_some(),
        }
    }

    /// Sends `frames` to each of `shards` (preceded by `Lost` if `gap`); returns how long it
    /// waited for full channels.
    async fn send(
        &self,
        topic: &Arc<str>,
        frames: &Frames,
        since: Instant,
        gap: bool,
        shards: u64,
    ) -> Duration {
        let mut blocked = Duration::ZERO;
        for shard in routes::selected(&self.shards, shards) {
            if gap {
                // Ahead of this publication: its subscribers missed the ones before it.
                let topic = topic.clone();
                let _ = shard.send(Command::Lost { topic }).await;
            }
            let cmd = Command::Deliver {
                topic: topic.clone(),
                frames: frames.clone(),
                since,
            };
            if let Err(mpsc::error::TrySendError::Full(cmd)) = shard.try_send(cmd) {
                let at = Instant::now();
                let _ = shard.send(cmd).await;
                blocked += at.elapsed();
            }
        }
        blocked
    }
}

/// Assigns positions and keeps the history of topics with a policy, serves joins and reads of
/// it, and hands every publication that reaches it to the shards holding its topic.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    /// Framing and sending to the shards.
    out: Fanout,
    metrics: Arc<Metrics>,
    /// The history of positioned topics.
    streams: Streams,
    recovery: RecoveryLimits,
    /// Positions come with the publications (Redis assigns them); the history is then a cache
    /// of the recent ones.
    broker_positions: bool,
    /// Reads what the cache lacks from the shared store (Redis), if there is one.
    fetch: Option<Fetch>,
    /// Ends an epoch whose stream went back (positions assigned by the broker only).
    end_epoch: Option<EndEpoch>,
    /// Joins waiting for a read, by read: many clients asking the same range cost one read.
    waiting: ahash::AHashMap<ReadKey, Vec<Waiting>>,
    /// Topics whose skipped offsets are being read, with the publications held meanwhile.
    healing: ahash::AHashMap<Arc<str>, Healing>,
    /// Reads of skipped offsets that came back (at most one per entry of `healing`).
    heals: (
        mpsc::UnboundedSender<ReadDone>,
        mpsc::UnboundedReceiver<ReadDone>,
    ),
    /// Joins whose position is past this instance's top, by topic, with their deadline: each
    /// joins once the instance has received its offset (see [`release_ahead`](Self::release_ahead)).
    ahead: ahash::AHashMap<Arc<str>, Vec<(Waiting, Instant)>>,
    /// Topics with a parked join whose deadline came. Unbounded, but one message per parked
    /// join.
    ahead_due: (
        mpsc::UnboundedSender<Arc<str>>,
        mpsc::UnboundedReceiver<Arc<str>>,
    ),
    /// Joins on a topic this instance has seen no publication of, waiting for a read of the
    /// publications from their offset on, by read (many joins, one read).
    cold: ahash::AHashMap<ReadKey, Vec<Waiting>>,
    /// Those reads that came back. Unbounded, but at most one message per entry of `cold`.
    colds: (
        mpsc::UnboundedSender<ReadDone>,
        mpsc::UnboundedReceiver<ReadDone>,
    ),
    /// Reads that came back. Unbounded, but at most one message per entry of `waiting`.
    reads: (
        mpsc::UnboundedSender<ReadDone>,
        mpsc::UnboundedReceiver<ReadDone>,
    ),
}

impl Dispatcher {
    /// A dispatcher without a frame bound (the benches' and tests' one).
    #[cfg(any(test, feature = "__bench_api"))]
    pub(crate) fn new(shards: Arc<[mpsc::Sender<Command>]>) -> Self {
        Self::bounded(shards, usize::MAX, Arc::default())
    }

    /// A dispatcher that drops (and counts in `metrics`) a payload whose frame exceeds
    /// `max_frame` bytes.
    pub(crate) fn bounded(
        shards: Arc<[mpsc::Sender<Command>]>,
        max_frame: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            out: Fanout {
                shards,
                routes: Arc::new(Routes::everywhere()),
                last: None,
                max_frame,
                metrics: metrics.clone(),
                oversized: (0, None),
                rtk1_conns: Arc::default(),
                policies: false,
            },
            metrics,
            streams: Streams::new(None, 0),
            recovery: RecoveryLimits {
                count: 300,
                bytes: max_frame / 2,
            },
            broker_positions: false,
            fetch: None,
            end_epoch: None,
            waiting: ahash::AHashMap::new(),
            reads: mpsc::unbounded_channel(),
            healing: ahash::AHashMap::new(),
            heals: mpsc::unbounded_channel(),
            ahead: ahash::AHashMap::new(),
            ahead_due: mpsc::unbounded_channel(),
            cold: ahash::AHashMap::new(),
            colds: mpsc::unbounded_channel(),
        }
    }

    /// Sends each publication only to the shards `routes` names for its topic.
    pub(crate) fn routed(mut self, routes: Arc<Routes>) -> Self {
        self.out.routes = routes;
        self
    }

    /// What delivers a publication of a topic without a policy, for a task that receives
    /// publications to deliver such ones itself.
    pub(crate) fn fanout(&self) -> Fanout {
        self.out.clone()
    }

    /// Keeps history in `streams`, recovers within `recovery`, and frames for `rtk1` while
    /// `rtk1_conns` is not zero.
    pub(crate) fn with_positions(
        mut self,
        streams: Streams,
        recovery: RecoveryLimits,
        rtk1_conns: Arc<AtomicUsize>,
    ) -> Self {
        self.out.policies = streams.enabled();
        self.streams = streams;
        self.recovery = recovery;
        self.out.rtk1_conns = rtk1_conns;
        self
    }

    /// Takes positions from the broker instead of assigning them, and reads a recovery's
    /// range the cache lacks with `fetch`.
    pub(crate) fn broker_positions(mut self, fetch: Fetch) -> Self {
        self.broker_positions = true;
        self.fetch = Some(fetch);
        self
    }

    /// How to end an epoch whose stream went back in the shared store.
    pub(crate) fn end_epoch(mut self, end: EndEpoch) -> Self {
        self.end_epoch = Some(end);
        self
    }

    /// [`Fanout::frame_for`].
    pub(crate) fn frame_for(&mut self, payload: &Bytes) -> PublicationFrames {
        self.out.frame_for(payload)
    }

    /// Frames one publication in every format needed, assigning its position on a topic with
    /// history (and keeping it there).
    fn frames_for(&mut self, msg: &Published) -> (Frames, Option<Position>, bool) {
        let mut gap = false;
        // Only a topic with history needs the time: a plain publication reads no clock here.
        let mut clock = None;
        let mut now = || *clock.get_or_insert_with(Instant::now);
        if let (Some(p), Some(end)) = (&msg.position, &self.end_epoch) {
            if self.streams.rolls_back(&msg.topic, p) {
                // The store handed out an offset of this epoch again (a promoted replica that
                // lacked the last publications): positions of this epoch no longer name one
                // publication each, so the epoch ends and recoveries from it are refused.
                tracing::warn!(
                    topic = %msg.topic,
                    epoch = %p.epoch,
                    offset = p.offset,
                    "the Redis stream went back; ending its epoch"
                );
                (end.0)(msg.topic.clone(), p.epoch.clone());
            }
        }
        let position = match &msg.position {
            Some(p) => match self.streams.observe(&msg.topic, p, now()) {
                Observed::NoPolicy => None,
                Observed::Follows => Some(p.clone()),
                Observed::Gap => {
                    gap = true;
                    Some(p.clone())
                }
            },
            None if self.streams.enabled() && !self.broker_positions => {
                self.streams.next_position(&msg.topic, now())
            }
            None => None,
        };
        let frames = self.out.frames(&msg.topic, position.as_ref(), &msg.payload);
        match &position {
            Some(p) => self
                .streams
                .keep(&msg.topic, p.offset, frames.clone(), now()),
            None if self.streams.enabled() => self.metrics.unpositioned_publish(),
            None => {}
        }
        (frames, position, gap)
    }

    /// Sends one message to the shards holding its topic, in order. Waits only when a shard's
    /// channel is full.
    pub(crate) async fn dispatch(&mut self, msg: Published) {
        self.dispatch_healing(msg, true).await;
    }

    /// [`dispatch`](Self::dispatch); with `may_heal`, a publication that skips offsets of the
    /// epoch the cache follows starts a read of the skipped ones from the shared store, and the
    /// topic's publications wait behind it (see [`heal_done`](Self::heal_done)).
    async fn dispatch_healing(&mut self, mut msg: Published, may_heal: bool) {
        if let Some(healing) = self.healing.get_mut(&msg.topic) {
            if healing.held.len() < HEAL_HOLD {
                healing.held.push(msg);
                return;
            }
            // Too many waiting: give the read up; the gap is reported instead.
            let healing = self.healing.remove(&msg.topic);
            for held in healing.into_iter().flat_map(|h| h.held) {
                Box::pin(self.dispatch_healing(held, false)).await;
            }
            return Box::pin(self.dispatch_healing(msg, false)).await;
        }
        if let (true, Some(fetch), Some(p)) = (may_heal, &self.fetch, &msg.position) {
            if let Some(top) = self.streams.skips(&msg.topic, p) {
                let (topic, from, to) = (msg.topic.clone(), top + 1, p.offset - 1);
                self.metrics.history_read();
                let (read, heals) = ((fetch.0)(topic.clone(), from, to), self.heals.0.clone());
                tokio::spawn(async move {
                    let _ = heals.send(((topic, from, to), read.await));
                });
                self.healing.insert(
                    msg.topic.clone(),
                    Healing {
                        from,
                        to,
                        held: vec![msg],
                    },
                );
                return;
            }
        }
        if !self.out.fits(&msg.topic, msg.payload.len()) {
            return;
        }
        let (frames, position, gap) = self.frames_for(&msg);
        if let Some(reply) = msg.reply.take() {
            let _ = reply.send(position);
        }
        let shards = self.out.routes.shards_for(&msg.topic);
        self.out
            .send(&msg.topic, &frames, msg.since, gap, shards)
            .await;
        if !self.ahead.is_empty() {
            self.release_ahead(&msg.topic).await;
        }
    }

    /// Joins parked on `topic` whose offset this instance has now received, or whose wait is
    /// over, join: with nothing to recover, or refused if the epoch changed meanwhile or the
    /// offset never came. Those still ahead stay parked.
    async fn release_ahead(&mut self, topic: &Arc<str>) {
        let Some(parked) = self.ahead.remove(topic) else {
            return;
        };
        let now = Instant::now();
        let mut still = Vec::new();
        for (w, deadline) in parked {
            if now < deadline && self.streams.ahead(topic, (&w.since.0, w.since.1)) {
                still.push((w, deadline));
            } else {
                let since = Some(w.since);
                self.join(
                    w.conn,
                    topic.clone(),
                    since,
                    None,
                    w.max_topics,
                    w.done,
                    now,
                )
                .await;
            }
        }
        if !still.is_empty() {
            self.ahead.insert(topic.clone(), still);
        }
    }

    /// A read of skipped offsets came back: they are delivered in order, then the publications
    /// held meanwhile. A read that failed or is not exactly the range leaves the gap to be
    /// reported (`insufficient_state`).
    async fn heal_done(&mut self, (topic, from, to): ReadKey, res: Result<Fetched, String>) {
        if !self
            .healing
            .get(&topic)
            .is_some_and(|h| h.from == from && h.to == to)
        {
            return;
        }
        let Some(healing) = self.healing.remove(&topic) else {
            return;
        };
        let held_epoch = healing.held.first().and_then(|m| m.position.clone());
        let healed = match res {
            Ok((epoch, entries))
                if held_epoch.is_some_and(|p| p.epoch == epoch)
                    && entries.len() as u64 == to + 1 - from
                    && entries.iter().zip(from..).all(|((o, _), want)| *o == want) =>
            {
                self.metrics.gap_healed();
                entries
                    .into_iter()
                    .map(|(offset, payload)| Published {
                        topic: topic.clone(),
                        payload,
                        position: Some(Position {
                            offset,
                            epoch: epoch.clone(),
                        }),
                        since: Instant::now(),
                        reply: None,
                    })
                    .collect()
            }
            Ok((epoch, entries)) => {
                // Trimmed away (more was missed than the stream keeps) or of another epoch.
                tracing::warn!(
                    topic = %topic,
                    from,
                    to,
                    epoch = %epoch,
                    kept = entries.len(),
                    "skipped publications are no longer all in the Redis stream; their subscribers are told"
                );
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(topic = %topic, error = %e, "reading skipped publications from Redis failed");
                Vec::new()
            }
        };
        let gave_up = healed.is_empty();
        for msg in healed {
            self.dispatch_healing(msg, false).await;
        }
        for (i, msg) in healing.held.into_iter().enumerate() {
            // After a read that could not fill the gap, the first held publication goes out as
            // it is (its subscribers get `insufficient_state`): asking again for the same range
            // would only hold the topic until the hold overflowed.
            self.dispatch_healing(msg, !(gave_up && i == 0)).await;
        }
    }

    /// Answers one request; a join is handed to the connection's shard with what it recovers.
    async fn request(&mut self, req: Request) {
        let now = Instant::now();
        match req {
            Request::Join {
                conn,
                topic,
                since,
                max_topics,
                done,
            } => {
                if let (Some(_), Some((epoch, offset))) = (&self.fetch, &since) {
                    if self.streams.ahead(&topic, (epoch, *offset)) {
                        // Published, and delivered by another instance, but not received here
                        // yet: join once it is, with nothing to recover and no duplicate.
                        let due = self.ahead_due.0.clone();
                        let key = topic.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(AHEAD_WAIT).await;
                            let _ = due.send(key);
                        });
                        let since = (epoch.clone(), *offset);
                        self.ahead.entry(topic).or_default().push((
                            Waiting {
                                conn,
                                since,
                                max_topics,
                                done,
                            },
                            now + AHEAD_WAIT,
                        ));
                        return;
                    }
                }
                if let (Some(fetch), Some((_, offset))) = (&self.fetch, &since) {
                    if self.streams.cold(&topic, now) {
                        // Nothing received here yet: read the stream from the client's offset
                        // (which must still be there, to prove the epoch and that nothing is
                        // missing) to one past what a recovery re-sends.
                        let (from, to) = (
                            (*offset).max(1),
                            offset.saturating_add(self.recovery.count as u64 + 1),
                        );
                        let waiting = Waiting {
                            conn,
                            since: since.unwrap_or_default(),
                            max_topics,
                            done,
                        };
                        let read = (fetch, &*self.metrics, &self.colds.0);
                        wait_for_read(&mut self.cold, read, (topic, from, to), waiting);
                        return;
                    }
                }
                if let (Some(fetch), Some((epoch, offset))) = (&self.fetch, &since) {
                    let head =
                        self.streams
                            .missing_head(&topic, (epoch, *offset), self.recovery, now);
                    if let Some((from, to)) = head {
                        let waiting = Waiting {
                            conn,
                            since: (epoch.clone(), *offset),
                            max_topics,
                            done,
                        };
                        let read = (fetch, &*self.metrics, &self.reads.0);
                        wait_for_read(&mut self.waiting, read, (topic, from, to), waiting);
                        return;
                    }
                }
                self.join(conn, topic, since, None, max_topics, done, now)
                    .await;
            }
            Request::Top { topic, reply } => {
                let _ = reply.send(self.streams.top(&topic, now));
            }
            Request::Page {
                topic,
                since,
                limit,
                reverse,
                reply,
            } => {
                let _ = reply.send(self.streams.page(&topic, since, limit, reverse, now));
            }
            Request::Remove { topic, reply } => {
                let _ = reply.send(self.streams.remove(&topic));
            }
        }
    }

    /// Subscribes `conn` to `topic` with what it recovers from `since` (with `head`, read from
    /// the shared store, in front of the cache).
    #[allow(clippy::too_many_arguments)]
    async fn join(
        &mut self,
        conn: Arc<Conn>,
        topic: Arc<str>,
        since: Option<(String, u64)>,
        head: Option<(u64, Vec<Bytes>)>,
        max_topics: usize,
        done: oneshot::Sender<bool>,
        now: Instant,
    ) {
        let since_ref = since.as_ref().map(|(e, o)| (e.as_str(), *o));
        let recovery = self
            .streams
            .recover_with(&topic, since_ref, head, self.recovery, now);
        if recovery.subscribed.was_recovering && recovery.subscribed.recoverable {
            self.metrics
                .recovery(recovery.subscribed.recovered, recovery.frames.len());
        }
        let mut prelude = Vec::with_capacity(1 + recovery.frames.len());
        prelude.push(wire::rtk1_subscribed(&topic, &recovery.subscribed));
        prelude.extend(recovery.frames);
        let cmd = Command::Subscribe {
            expected: Some(self.out.routes.expect(&topic)),
            topic,
            max_topics,
            done,
            prelude,
            positioned: recovery.subscribed.recoverable,
            conn: conn.clone(),
        };
        if let Some(shard) = self.out.shards.get(conn.shard) {
            let _ = shard.send(cmd).await;
        }
    }

    /// A publication read back from the shared store, framed as if it had been received.
    fn read_frames(&mut self, topic: &str, position: &Position, payload: &Bytes) -> Frames {
        Frames {
            verbatim: self.frame_for(payload),
            rtk1: Some(PublicationFrames::new(wire::rtk1_pub(
                topic,
                Some(position),
                payload,
            ))),
            positioned: true,
        }
    }

    /// Puts the publications of a read that come just before `topic`'s cache in front of it
    /// (see [`Streams::prepend`]).
    fn cache_read(&mut self, topic: &str, epoch: &str, entries: &[(u64, Bytes)], now: Instant) {
        let Some((first, room)) = self.streams.room_before(topic, epoch) else {
            return;
        };
        // Only what could be kept is framed: the newest `room` before the cache.
        let before = entries.partition_point(|(offset, _)| *offset < first);
        let read = entries[before.saturating_sub(room)..before]
            .iter()
            .map(|(offset, payload)| {
                let position = Position {
                    offset: *offset,
                    epoch: epoch.to_owned(),
                };
                (*offset, self.read_frames(topic, &position, payload))
            })
            .collect();
        self.streams.prepend(topic, epoch, read, now);
    }

    /// A read for joins on a topic this instance had seen nothing of came back. If it starts at
    /// the offset asked and is contiguous and shorter than asked (so it reaches the top), its
    /// publications become the topic's cache, exactly as if they had been received; every
    /// join then goes the usual way (recovered from the cache, or refused). Publications this
    /// instance misses before its subscription to the topic is live show up as skipped offsets
    /// at the next one, and are read back and delivered in order then.
    async fn cold_done(&mut self, (topic, from, to): ReadKey, res: Result<Fetched, String>) {
        let Some(waiting) = self.cold.remove(&(topic.clone(), from, to)) else {
            return;
        };
        let now = Instant::now();
        match res {
            Ok((epoch, entries))
                if self.streams.cold(&topic, now)
                    && !epoch.is_empty()
                    && entries.first().is_some_and(|(o, _)| *o == from)
                    && entries.last().is_some_and(|(o, _)| *o < to)
                    && entries.iter().zip(from..).all(|((o, _), want)| *o == want) =>
            {
                for (offset, payload) in entries {
                    let position = Position {
                        offset,
                        epoch: epoch.clone(),
                    };
                    self.streams.observe(&topic, &position, now);
                    let frames = self.read_frames(&topic, &position, &payload);
                    self.streams.keep(&topic, offset, frames, now);
                }
            }
            // A publication arrived meanwhile: what the read has before it still serves the
            // next recoveries.
            Ok((epoch, entries)) => self.cache_read(&topic, &epoch, &entries, now),
            Err(e) => {
                tracing::warn!(topic = %topic, error = %e, "reading history from Redis failed");
            }
        }
        for w in waiting {
            if self.streams.cold(&topic, now) {
                // Still nothing known: refused, as it was before the read.
                let since = Some(w.since);
                self.join(
                    w.conn,
                    topic.clone(),
                    since,
                    None,
                    w.max_topics,
                    w.done,
                    now,
                )
                .await;
            } else {
                let join = Request::Join {
                    conn: w.conn,
                    topic: topic.clone(),
                    since: Some(w.since),
                    max_topics: w.max_topics,
                    done: w.done,
                };
                Box::pin(self.request(join)).await;
            }
        }
    }

    /// A read from the shared store came back: the joins waiting for it recover with it, or
    /// get `recovered: false` if it failed or is not exactly the range asked.
    async fn read_done(&mut self, (topic, from, to): ReadKey, res: Result<Fetched, String>) {
        let Some(waiting) = self.waiting.remove(&(topic.clone(), from, to)) else {
            return;
        };
        let read = match res {
            Ok((epoch, entries)) => Some((epoch, entries)),
            Err(e) => {
                tracing::warn!(topic = %topic, error = %e, "reading history from Redis failed");
                None
            }
        };
        let now = Instant::now();
        if let Some((epoch, entries)) = &read {
            // Kept in front of the cache: the next recovery from the same offset reads nothing.
            self.cache_read(&topic, epoch, entries, now);
        }
        // Every join waiting here asked for the same range: it is framed once, and each join of
        // the epoch read gets the same frames (a reference count each).
        let framed = read.as_ref().and_then(|(epoch, entries)| {
            let exact = entries.len() as u64 == to + 1 - from
                && entries.iter().zip(from..).all(|((o, _), want)| *o == want);
            exact.then(|| {
                let position = |offset| Position {
                    offset,
                    epoch: epoch.clone(),
                };
                let frames = entries
                    .iter()
                    .map(|(o, p)| wire::rtk1_pub(&topic, Some(&position(*o)), p))
                    .collect::<Vec<_>>();
                (epoch, frames)
            })
        });
        for w in waiting {
            let frames = framed
                .as_ref()
                .filter(|(epoch, _)| **epoch == w.since.0)
                .map(|(_, frames)| frames.clone());
            let head = Some((to, frames.unwrap_or_default()));
            let since = Some(w.since);
            self.join(
                w.conn,
                topic.clone(),
                since,
                head,
                w.max_topics,
                w.done,
                now,
            )
            .await;
        }
    }

    /// Runs until every sender of `rx` is gone.
    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Published>,
        mut requests: mpsc::Receiver<Request>,
    ) {
        let mut batch = Vec::with_capacity(64);
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut requests_open = true;
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, 64) => {
                    if n == 0 {
                        return;
                    }
                    for msg in batch.drain(..) {
                        self.dispatch(msg).await;
                    }
                }
                req = requests.recv(), if requests_open => match req {
                    Some(req) => self.request(req).await,
                    None => requests_open = false,
                },
                Some((key, res)) = self.reads.1.recv() => self.read_done(key, res).await,
                Some((key, res)) = self.heals.1.recv() => self.heal_done(key, res).await,
                Some(topic) = self.ahead_due.1.recv() => self.release_ahead(&topic).await,
                Some((key, res)) = self.colds.1.recv() => self.cold_done(key, res).await,
                _ = sweep.tick(), if self.streams.enabled() => {
                    self.streams.sweep(Instant::now());
                }
            }
        }
    }
}

/// Parks `waiting` on the read of `key` in `parked`, starting that read (through `fetch`,
/// its result sent to `done`) only if no join waits for it yet: many joins, one read.
fn wait_for_read(
    parked: &mut ahash::AHashMap<ReadKey, Vec<Waiting>>,
    (fetch, metrics, done): (&Fetch, &Metrics, &mpsc::UnboundedSender<ReadDone>),
    key: ReadKey,
    waiting: Waiting,
) {
    let joins = parked.entry(key.clone()).or_default();
    if joins.is_empty() {
        metrics.history_read();
        let (topic, from, to) = key.clone();
        let (read, done) = ((fetch.0)(topic, from, to), done.clone());
        tokio::spawn(async move {
            let _ = done.send((key, read.await));
        });
    }
    joins.push(waiting);
}

/// The length of the frame `frame::encode` writes for a payload of `len` bytes.
fn frame_len(len: usize) -> usize {
    let header = match len {
        0..126 => 2,
        126..65536 => 4,
        _ => 10,
    };
    len.saturating_add(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An identical payload reuses the previous frame, whatever buffer it arrives in; any other
    /// payload, even one the previous ends with, gets its own.
    #[test]
    fn an_identical_payload_reuses_the_frame_and_no_other_does() {
        let mut d = Dispatcher::new(Arc::from(Vec::new()));
        let mut frame_for = |p: &Bytes| d.frame_for(p).plain().clone();
        let first = frame_for(&Bytes::from_static(b"{\"n\":1}"));
        let again = frame_for(&Bytes::copy_from_slice(b"{\"n\":1}"));
        assert_eq!(first.as_ptr(), again.as_ptr(), "framed once");
        let suffix = frame_for(&Bytes::from_static(b"\"n\":1}"));
        assert_eq!(frame::encoded_payload(&suffix), Some(&b"\"n\":1}"[..]));
        let long = Bytes::from(vec![b'x'; 300]);
        let (a, b) = (frame_for(&long), frame_for(&long.clone()));
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(frame::encoded_payload(&a), Some(&long[..]));
    }

    /// A dispatcher taking positions from the broker (every topic keeps history), and its one
    /// shard's channel.
    fn external() -> (Dispatcher, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(64);
        let policy = crate::history::TopicPolicy::history(100, Duration::from_secs(60));
        let rule: crate::history::PolicyRule = Arc::new(move |_: &str| Some(policy.clone()));
        let streams = Streams::new(Some(rule), 1 << 20).external();
        let limits = RecoveryLimits {
            count: 300,
            bytes: 1 << 20,
        };
        let fetch = Fetch(Arc::new(|_, _, _| {
            Box::pin(async { Err("no store in this test".to_string()) })
        }));
        let d = Dispatcher::bounded(Arc::from(vec![tx]), 1 << 20, Arc::default())
            .with_positions(streams, limits, Arc::default())
            .broker_positions(fetch);
        (d, rx)
    }

    fn at(offset: u64) -> Published {
        Published {
            topic: Arc::from("t"),
            payload: Bytes::from(format!("{offset}")),
            since: Instant::now(),
            position: Some(Position {
                offset,
                epoch: "E".into(),
            }),
            reply: None,
        }
    }

    fn join(since: u64) -> (Request, oneshot::Receiver<bool>) {
        let conn = Arc::new(Conn::new(
            uuid::Uuid::nil(),
            0,
            1 << 20,
            crate::SlowConsumerPolicy::Close,
        ));
        let (done, rx) = oneshot::channel();
        let req = Request::Join {
            conn,
            topic: Arc::from("t"),
            since: Some(("E".into(), since)),
            max_topics: 10,
            done,
        };
        (req, rx)
    }

    /// What the shard got next: `Deliver`'s payload, or `Subscribe`'s `subscribed` message.
    fn next(rx: &mut mpsc::Receiver<Command>) -> Option<serde_json::Value> {
        match rx.try_recv().ok()? {
            Command::Deliver { frames, .. } => {
                let payload = frame::encoded_payload(frames.verbatim.plain()).unwrap();
                Some(serde_json::json!({ "deliver": std::str::from_utf8(payload).unwrap() }))
            }
            Command::Subscribe { prelude, .. } => {
                let payload = frame::encoded_payload(&prelude[0]).unwrap();
                let mut s: serde_json::Value = serde_json::from_slice(payload).unwrap();
                s["frames"] = (prelude.len() - 1).into();
                Some(s)
            }
            _ => panic!("unexpected command"),
        }
    }

    /// A publication goes only to the shards holding its topic; while a subscribe the
    /// dispatcher sent is on its way, to every shard, so the joining connection misses nothing
    /// dispatched after it.
    #[tokio::test]
    async fn a_publication_goes_to_the_shards_of_its_topic_and_to_a_joining_one() {
        let (tx0, mut rx0) = mpsc::channel(16);
        let (tx1, mut rx1) = mpsc::channel(16);
        let routes = Arc::new(Routes::new(2, None));
        let mut d = Dispatcher::new(Arc::from(vec![tx0, tx1])).routed(routes.clone());
        let publish = |n: u32| Published {
            topic: Arc::from("t"),
            payload: Bytes::from(n.to_string()),
            since: Instant::now(),
            position: None,
            reply: None,
        };
        d.dispatch(publish(1)).await;
        assert!(
            rx0.try_recv().is_err() && rx1.try_recv().is_err(),
            "nobody holds t"
        );

        let topic: Arc<str> = Arc::from("t");
        routes.add(&topic, 1);
        d.dispatch(publish(2)).await;
        assert!(rx0.try_recv().is_err(), "shard 0 does not hold t");
        assert_eq!(next(&mut rx1).unwrap()["deliver"], "2");

        // A connection of shard 0 joins through the dispatcher.
        let (mut req, _done) = join(0);
        if let Request::Join { since, .. } = &mut req {
            *since = None;
        }
        d.request(req).await;
        let subscribe = rx0.try_recv().unwrap();
        d.dispatch(publish(3)).await;
        assert_eq!(
            next(&mut rx0).unwrap()["deliver"],
            "3",
            "behind the subscribe"
        );
        assert_eq!(next(&mut rx1).unwrap()["deliver"], "3");

        // Shard 0 applies it: its route is set, then the subscribe goes.
        routes.add(&topic, 0);
        drop(subscribe);
        routes.remove(&topic, 1);
        d.dispatch(publish(4)).await;
        assert_eq!(next(&mut rx0).unwrap()["deliver"], "4");
        assert!(rx1.try_recv().is_err(), "shard 1 no longer holds t");
    }

    /// The store hands out an offset of the epoch again (a failover to a replica that lacked
    /// the last publications): the subscribers are told, and the epoch is ended in the store,
    /// once, so that no position of it can be recovered from past the publications it lost.
    #[tokio::test]
    async fn a_stream_that_goes_back_ends_its_epoch() {
        let (d, mut rx) = external();
        let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = ended.clone();
        let mut d = d.end_epoch(EndEpoch(Arc::new(move |topic, epoch| {
            seen.lock().unwrap().push((topic.to_string(), epoch));
        })));
        for o in 1..=3 {
            d.dispatch(at(o)).await;
            assert_eq!(next(&mut rx).unwrap()["deliver"], o.to_string());
        }
        assert!(ended.lock().unwrap().is_empty());
        d.dispatch(at(2)).await;
        assert!(matches!(rx.try_recv(), Ok(Command::Lost { .. })));
        assert_eq!(next(&mut rx).unwrap()["deliver"], "2");
        d.dispatch(at(3)).await;
        assert_eq!(next(&mut rx).unwrap()["deliver"], "3");
        assert_eq!(*ended.lock().unwrap(), [("t".to_string(), "E".to_string())]);
    }

    /// More was skipped than the stream still keeps: the read comes back short, the gap is
    /// reported once (`Lost`) and publications flow again at once, without asking for the same
    /// range over and over while the topic is held.
    #[tokio::test]
    async fn a_gap_the_stream_no_longer_holds_is_reported_once_and_delivery_goes_on() {
        let (d, mut rx) = external();
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = reads.clone();
        let mut d = d.broker_positions(Fetch(Arc::new(move |_, _, to| {
            counted.fetch_add(1, Ordering::Relaxed);
            // Only the last of the skipped offsets is still in the stream.
            Box::pin(async move { Ok(("E".to_string(), vec![(to, Bytes::from_static(b"x"))])) })
        })));
        for o in 1..=2 {
            d.dispatch(at(o)).await;
            assert_eq!(next(&mut rx).unwrap()["deliver"], o.to_string());
        }
        d.dispatch(at(6)).await;
        d.dispatch(at(7)).await;
        assert!(rx.try_recv().is_err(), "held while 3..=5 are read");
        let (key, res) = d.heals.1.recv().await.unwrap();
        d.heal_done(key, res).await;
        assert!(matches!(rx.try_recv(), Ok(Command::Lost { .. })));
        assert_eq!(next(&mut rx).unwrap()["deliver"], "6");
        assert_eq!(next(&mut rx).unwrap()["deliver"], "7");
        d.dispatch(at(8)).await;
        assert_eq!(next(&mut rx).unwrap()["deliver"], "8");
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        assert!(d.healing.is_empty());
    }

    /// A client that got offsets from an instance further ahead joins here with a position
    /// past this instance's top: it joins right after the delivery of its offset, recovering
    /// nothing, so it gets each later publication once and none twice.
    #[tokio::test]
    async fn a_join_ahead_of_the_instance_waits_for_its_offset() {
        let (mut d, mut rx) = external();
        for o in 1..=2 {
            d.dispatch(at(o)).await;
            assert_eq!(next(&mut rx).unwrap()["deliver"], o.to_string());
        }
        let (req, mut done) = join(4);
        d.request(req).await;
        assert!(next(&mut rx).is_none(), "parked");
        d.dispatch(at(3)).await;
        assert_eq!(next(&mut rx).unwrap()["deliver"], "3");
        assert!(next(&mut rx).is_none(), "still parked");
        d.dispatch(at(4)).await;
        assert_eq!(next(&mut rx).unwrap()["deliver"], "4");
        let s = next(&mut rx).unwrap();
        assert_eq!(
            (&s["recovered"], &s["o"], &s["frames"]),
            (&true.into(), &4.into(), &0.into()),
            "{s}"
        );
        d.dispatch(at(5)).await;
        assert_eq!(next(&mut rx).unwrap()["deliver"], "5");
        assert!(done.try_recv().is_err(), "the shard answers `done`");
    }

    /// A position the instance never reaches (made up, or of a publication it lost) is refused
    /// once the wait is over.
    #[tokio::test]
    async fn a_join_ahead_that_is_never_reached_is_refused_after_the_wait() {
        let (mut d, mut rx) = external();
        d.dispatch(at(1)).await;
        next(&mut rx).unwrap();
        let (req, _done) = join(99);
        d.request(req).await;
        d.release_ahead(&Arc::from("t")).await;
        assert!(next(&mut rx).is_none(), "parked until its deadline");
        // Its deadline (AHEAD_WAIT, which the timer task reports) has come.
        for (_, deadline) in d.ahead.get_mut("t").unwrap() {
            *deadline = Instant::now();
        }
        d.release_ahead(&Arc::from("t")).await;
        let s = next(&mut rx).unwrap();
        assert_eq!(
            (&s["recovered"], &s["o"]),
            (&false.into(), &1.into()),
            "{s}"
        );
        assert!(d.ahead.is_empty());
    }

    #[test]
    fn frame_len_is_the_encoded_length() {
        for len in [0, 125, 126, 65535, 65536, 70000] {
            let payload = vec![b'x'; len];
            assert_eq!(frame_len(len), frame::encode_text(&payload).len(), "{len}");
        }
    }
}
