//! One connection's outbound queue: pre-encoded frames waiting for its socket, bounded in
//! bytes, and what happens past the bound (the [`SlowConsumerPolicy`]).
//!
//! The queue holds complete frames ([`Bytes`]): a broadcast frame is shared by every subscriber,
//! so queuing it costs a refcount and a slot, never a copy (invariant 2, docs/architecture.md).
//! Data frames are bounded in bytes and control frames in count, so nothing a client does or
//! fails to do grows it without limit (invariants 4 and 7).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::frame;

/// What a connection whose client reads too slowly gets, once its outbound queue would pass its
/// byte bound ([`outbound_queue_bytes`](crate::WebsocketServiceBuilder::outbound_queue_bytes)).
///
/// The bound counts every data byte the connection holds: frames queued, frames its writer has
/// taken and not finished writing, and the rest of a partly written frame. A single message
/// larger than the bound never fits: it meets the policy at once, whether the connection is busy
/// or idle (`Close` closes with 1008, the others drop that message).
///
/// ## Lagging
/// A client that reads slower than messages arrive falls behind; its queue grows until the
/// bound. What happens then is decided per connection, and never slows other clients or the
/// shard delivering to it:
/// - [`Close`](Self::Close) (default): "slow" means *not draining*. A burst can pass the bound
///   even for a client that reads as fast as it can (its socket buffers have not grown yet), so
///   the connection may stay over the bound for
///   [`slow_consumer_grace`](crate::WebsocketServiceBuilder::slow_consumer_grace) (default 1 s,
///   reset whenever it drains back under), but never past
///   [`outbound_queue_ceiling_bytes`](crate::WebsocketServiceBuilder::outbound_queue_ceiling_bytes)
///   (default 4× the bound). Still over after the grace (checked by the next message, or by the
///   writer blocked on the full socket, once per grace) or about to pass the ceiling: everything
///   queued is dropped, what the writer holds is cut at the next frame boundary, and the client
///   receives what its socket already buffered, the rest of the frame in progress, then a close
///   frame with code 1008 (`"slow consumer: outbound queue full"`). Counted in
///   `slow_consumer_closes`. The client knows it missed messages and can reconnect and resync.
///   Frames are shared, so a broadcast burst held by many lagging connections costs its size
///   once; the ceiling bounds the worst case.
/// - [`DropOldest`](Self::DropOldest): the oldest queued messages are dropped until the new one
///   fits; the connection stays open. The client silently misses a run of messages (a gap), then
///   continues with the newest ones. Counted in `slow_consumer_drops`. No grace or ceiling:
///   this policy acts at the bound (while frames the writer holds fill it, the newest is kept).
/// - [`LatestPerTopic`](Self::LatestPerTopic): conflation. When the queue is full, it is
///   compacted to the newest message of each topic (direct replies are kept), the incoming
///   message replacing its topic's; only if that is still too big are the oldest dropped, like
///   `DropOldest`. A client that keeps up gets every message; a lagging dashboard gets the
///   latest value of every topic instead of a backlog. Counted in `slow_consumer_drops`.
///
/// Independently, a write that makes no progress for the write timeout closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SlowConsumerPolicy {
    /// Close with 1008 and drop what was queued.
    #[default]
    Close,
    /// Drop the oldest queued messages; keep the connection.
    DropOldest,
    /// Keep only the newest queued message of each topic; keep the connection.
    LatestPerTopic,
}

/// A queued frame's topic, for conflation: the address of the shard's interned topic name, or
/// [`NO_TOPIC`] for direct frames. Only compared, never dereferenced.
pub(crate) type TopicKey = usize;
pub(crate) const NO_TOPIC: TopicKey = 0;
/// Set in a [`TopicKey`] (whose address bits are aligned, so the lowest is free) when the frame
/// has a position the client tracks (`rtk1` on a topic with history): dropping it leaves the
/// client with a gap it must be told about, so the queue records its topic in
/// [`Queue::lost`].
pub(crate) const POSITIONED: TopicKey = 1;

/// Most control frames of one kind (pong, ping) waiting to be written.
pub(super) const MAX_PENDING_CONTROL: usize = 16;

/// Default [`Limits::grace`]: see `Config::slow_consumer_grace`.
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(1);
/// Default [`Limits::ceiling`], in multiples of the bound.
pub(crate) const DEFAULT_CEILING_FACTOR: usize = 4;

/// A connection's byte bound and how long, and how far, a `Close` connection may stay over it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) bound: usize,
    /// Never held past this, whatever the grace (at least `bound`).
    pub(super) ceiling: usize,
    pub(super) grace: Duration,
}

/// What [`Queue::push`] did with a data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Queued {
    /// Queued, after dropping this many older frames (0 when nothing was dropped).
    Yes { dropped: u64 },
    /// Not queued: the frame alone is larger than the bound (`DropOldest`, `LatestPerTopic`).
    DroppedItself { dropped: u64 },
    /// Past the bound under [`SlowConsumerPolicy::Close`]: the queue was cleared and the 1008
    /// close frame queued.
    Overflow,
    /// A close is queued: nothing more is accepted.
    Closed,
}

/// Frames waiting to be written, in the order they go out: the rest of a partly written frame,
/// control frames, data frames, then the close frame.
#[derive(Debug, Default)]
pub(super) struct Queue {
    /// The rest of a frame a direct write left unfinished: written before anything else, and
    /// never dropped by a slow-consumer policy (the stream would lose its framing).
    pub(super) partial: Option<Bytes>,
    /// Control frames (pongs, heartbeat pings) sent before queued data: at most
    /// [`MAX_PENDING_CONTROL`] of each kind, the newest, so a ping flood cannot grow it.
    control: Vec<Bytes>,
    /// Data frames with their topic, in delivery order.
    data: VecDeque<(TopicKey, Bytes)>,
    /// Sum of `data` lengths.
    data_bytes: usize,
    /// Bytes of data the writer has taken (a partial rest included) and not finished writing:
    /// still held in memory, so still counted against the bound ([`held`](Self::held)).
    in_flight: usize,
    /// When [`held`](Self::held) data last went over the bound and has stayed over since
    /// (policy `Close`): the start of the grace. Read only while over the bound.
    pub(super) over_since: Option<Instant>,
    /// Most data held while over the bound (0 if it never went over).
    pub(super) peak: usize,
    /// A close without flush is queued: what the writer holds unwritten may be cut at the next
    /// frame boundary.
    pub(super) discard: bool,
    /// Close frame to send once `data` is written; after it nothing else is accepted. An empty
    /// frame marks a failed socket: nothing is written any more.
    pub(super) close: Option<Bytes>,
    /// Topics (keys with [`POSITIONED`]) of which a positioned frame was dropped since the last
    /// [`take_lost`](Self::take_lost): each at most once, so at most one per joined topic.
    /// Boxed (one word): only a connection that lost frames has any, and a `Vec` would take
    /// three words in every connection's queue.
    lost: Option<Box<Lost>>,
}

impl Queue {
    /// Whether anything waits to be written: a partial frame's rest, control frames or data.
    pub(super) fn pending(&self) -> bool {
        self.partial.is_some() || !self.control.is_empty() || !self.data.is_empty()
    }

    /// Data bytes this connection holds: queued, taken by the writer and not yet written, and
    /// the rest of a partly written direct write. What the byte bound limits.
    pub(super) fn held(&self) -> usize {
        self.data_bytes + self.in_flight + self.partial.as_ref().map_or(0, Bytes::len)
    }

    /// Queues a data frame of `topic`; past `max_bytes` of [`held`](Self::held) data, `policy`
    /// decides. Frames the writer already holds, and a partial rest, cannot be dropped: while
    /// they alone fill the bound, `DropOldest` and `LatestPerTopic` still keep the newest frame
    /// (so the client resumes with it), and the connection holds at most the bound plus it.
    ///
    /// Under `Close`, going over the bound starts the grace: the frame is queued as long as the
    /// total stays under `limits.ceiling` and the grace (from when it went over) has not run
    /// out; `now` is read only then.
    pub(super) fn push(
        &mut self,
        frame: Bytes,
        topic: TopicKey,
        limits: Limits,
        policy: SlowConsumerPolicy,
        now: impl FnOnce() -> Instant,
    ) -> Queued {
        if self.close.is_some() {
            return Queued::Closed;
        }
        let max_bytes = limits.bound;
        let mut dropped = 0u64;
        if self.held() + frame.len() > max_bytes && policy == SlowConsumerPolicy::LatestPerTopic {
            dropped += self.conflate(topic);
        }
        if self.held() + frame.len() > max_bytes {
            match policy {
                SlowConsumerPolicy::Close => {
                    let held = self.held() + frame.len();
                    let refused = frame.len() > max_bytes || held > limits.ceiling || {
                        let now = now();
                        let since = *self.over_since.get_or_insert(now);
                        now.saturating_duration_since(since) >= limits.grace
                    };
                    if refused {
                        self.close_slow_consumer();
                        return Queued::Overflow;
                    }
                }
                SlowConsumerPolicy::DropOldest | SlowConsumerPolicy::LatestPerTopic => {
                    while self.held() + frame.len() > max_bytes {
                        match self.data.pop_front() {
                            Some((key, old)) => {
                                self.data_bytes -= old.len();
                                dropped += 1;
                                record_lost(&mut self.lost, key);
                            }
                            None if frame.len() > max_bytes => {
                                record_lost(&mut self.lost, topic);
                                return Queued::DroppedItself { dropped };
                            }
                            // Only what the writer holds is left: keep the newest frame.
                            None => break,
                        }
                    }
                }
            }
        }
        self.data_bytes += frame.len();
        self.data.push_back((topic, frame));
        let held = self.held();
        if held <= max_bytes {
            self.over_since = None;
        } else if held > self.peak {
            self.peak = held;
        }
        Queued::Yes { dropped }
    }

    /// The positioned topics that lost a frame since the last call.
    pub(super) fn take_lost(&mut self) -> Vec<TopicKey> {
        self.lost.take().map_or_else(Vec::new, |lost| lost.0)
    }

    /// Drops the queued data and queues the 1008 close (policy `Close`).
    pub(super) fn close_slow_consumer(&mut self) {
        self.clear_data();
        self.discard = true;
        self.close = Some(frame::encode_close(
            frame::close_code::POLICY_VIOLATION,
            "slow consumer: outbound queue full",
        ));
    }

    /// Whether a `Close` connection has been over the bound for the whole grace at `now`.
    pub(super) fn lagged(&self, limits: Limits, now: Instant) -> bool {
        self.held() > limits.bound
            && self
                .over_since
                .is_some_and(|since| now.saturating_duration_since(since) >= limits.grace)
    }

    /// Queues a control frame ahead of any queued data. Past [`MAX_PENDING_CONTROL`] pending
    /// frames of its kind, the oldest is dropped. `false` once a close is queued.
    pub(super) fn push_control(&mut self, frame: Bytes) -> bool {
        if self.close.is_some() {
            return false;
        }
        let kind = frame.first().copied();
        let same_kind = self
            .control
            .iter()
            .filter(|f| f.first().copied() == kind)
            .count();
        if same_kind >= MAX_PENDING_CONTROL {
            if let Some(oldest) = self.control.iter().position(|f| f.first().copied() == kind) {
                self.control.remove(oldest);
            }
        }
        self.control.push(frame);
        true
    }

    /// Drops every queued data frame (not the partial rest, which keeps the stream framed).
    pub(super) fn clear_data(&mut self) {
        self.data.clear();
        self.data_bytes = 0;
    }

    /// Drops everything: the socket failed.
    pub(super) fn clear_all(&mut self) {
        self.clear_data();
        self.control.clear();
        self.partial = None;
        self.in_flight = 0;
    }

    /// Moves everything queued into `batch`, in the order it goes out. Returns whether the batch
    /// ends with the close frame.
    /// The data taken stays counted (`in_flight`) until
    /// [`batch_written`](Self::batch_written).
    pub(super) fn take_into(&mut self, batch: &mut Vec<Bytes>) -> bool {
        self.in_flight = self.held();
        batch.extend(self.partial.take());
        batch.append(&mut self.control);
        batch.extend(self.data.drain(..).map(|(_, frame)| frame));
        self.data_bytes = 0;
        match &self.close {
            Some(close) => {
                batch.push(close.clone());
                true
            }
            None => false,
        }
    }

    /// The writer's batch has `unwritten` bytes left: the data it still holds is at most that
    /// (control frames in the batch only make this an over-estimate).
    pub(super) fn batch_progress(&mut self, unwritten: usize, bound: usize) {
        self.in_flight = self.in_flight.min(unwritten);
        if self.held() <= bound {
            self.over_since = None;
        }
    }

    /// The writer finished (or gave up) the batch it took: its bytes are no longer held.
    pub(super) fn batch_written(&mut self, bound: usize) {
        self.in_flight = 0;
        if self.held() <= bound {
            self.over_since = None;
        }
    }

    /// Keeps, of each topic's queued frames, only the newest — and none of `incoming`'s topic,
    /// whose newer frame is about to be queued. Direct frames stay. Returns how many frames were
    /// dropped.
    fn conflate(&mut self, incoming: TopicKey) -> u64 {
        let mut seen = ahash::AHashSet::new();
        if incoming != NO_TOPIC {
            seen.insert(incoming);
        }
        let before = self.data.len();
        let mut kept = VecDeque::with_capacity(before);
        for (topic, frame) in self.data.drain(..).rev() {
            if topic == NO_TOPIC || seen.insert(topic) {
                kept.push_front((topic, frame));
            } else {
                self.data_bytes -= frame.len();
                record_lost(&mut self.lost, topic);
            }
        }
        self.data = kept;
        (before - self.data.len()) as u64
    }
}

/// Records that a frame of `key` was dropped: adds `key` to `lost` if it is positioned and not
/// there yet. A free function, so that it can run while the queue's frames are borrowed.
fn record_lost(lost: &mut Option<Box<Lost>>, key: TopicKey) {
    if key & POSITIONED != 0 {
        let lost = &mut lost.get_or_insert_default().0;
        if !lost.contains(&key) {
            lost.push(key);
        }
    }
}

/// The positioned topics a connection lost frames of ([`Queue::take_lost`]).
#[derive(Debug, Default)]
struct Lost(Vec<TopicKey>);
