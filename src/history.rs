//! Positioned topics: the policy an application gives a topic, the positions of its
//! publications, and the in-process store of their history.
//!
//! A topic with a [`TopicPolicy`] has a *stream*: an epoch (a short random string minted when
//! the stream is created) and a top offset, which grows by exactly one per publication, from 1.
//! The stream keeps the last publications, already framed, for recovery: a reconnecting client
//! that says which position it has gets every publication after it, re-sent as the very same
//! shared [`Bytes`], or is told it cannot (never part of them).
//!
//! [`Streams`] is the in-process store. It is owned by the dispatcher task, the one point that
//! orders every publication of the instance, so assigning an offset, keeping the frame and
//! handing it to the shards are one step with no lock (invariants 1 and 3,
//! docs/architecture.md). With Redis, Redis assigns positions and this store caches the
//! publications the instance received ([`Streams::observe`]). Its operations:
//! assign the next position and keep the frame ([`Streams::next_position`],
//! [`Streams::keep`]), read a range for a recovery ([`Streams::recover_with`]), read a page
//! ([`Streams::page`]), the top ([`Streams::top`]), remove ([`Streams::remove`]) and expire
//! ([`Streams::sweep`]).
//!
//! Memory is bounded (invariant 4): per stream by the policy's size and TTL, over all streams by
//! a byte cap that drops the globally oldest publications first.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytes::Bytes;

use crate::frame;
use crate::wire::{Frames, Subscribed};

/// How a topic keeps history, chosen by the application per topic (see
/// [`WebsocketServiceBuilder::topic_policy`](crate::WebsocketServiceBuilder::topic_policy)).
///
/// A topic without a policy behaves exactly as in 0.1.0: publications have no position and a
/// client that reconnects misses what was published meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicPolicy {
    /// Most publications kept for recovery.
    pub history_size: usize,
    /// How long a publication is kept for recovery.
    pub history_ttl: Duration,
    /// How long the stream's identity (its epoch and top offset) outlives its last
    /// publication. Past it, the stream is forgotten and the next publication starts a new epoch
    /// at offset 1: positions of the old epoch no longer recover.
    pub epoch_ttl: Duration,
    /// Whether the kit tracks who is in the topic (see [`presence`](Self::presence)).
    pub presence: bool,
}

impl TopicPolicy {
    /// Keep the last `size` publications for at most `ttl`; the epoch lives 24 hours after the
    /// last publication (or `ttl`, if longer).
    pub fn history(size: usize, ttl: Duration) -> Self {
        Self {
            history_size: size.max(1),
            history_ttl: ttl,
            epoch_ttl: ttl.max(Duration::from_secs(24 * 3600)),
            presence: false,
        }
    }

    /// Tracks presence in the topic: which users are in it, with how many connections and the
    /// info [`presence_user`](crate::WebsocketServiceBuilder::presence_user) gives each, on
    /// every instance; `rtk1` subscribers get `join` when a user's first connection arrives
    /// and `leave` when their last one left (see the presence guide). Default: off.
    pub fn presence(mut self, on: bool) -> Self {
        self.presence = on;
        self
    }

    /// How long the epoch outlives the last publication (at least the history TTL).
    pub fn epoch_ttl(mut self, ttl: Duration) -> Self {
        self.epoch_ttl = ttl.max(self.history_ttl);
        self
    }
}

/// Where a publication sits in its topic's stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    /// Contiguous from 1 within an epoch.
    pub offset: u64,
    /// The stream's identity: a stream that was lost or recreated has another one, so an
    /// offset is only meaningful with its epoch.
    pub epoch: String,
}

/// How a position assigned elsewhere fits the stream this instance saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Observed {
    /// The topic has no policy.
    NoPolicy,
    /// The next offset of the same epoch (or the first position seen).
    Follows,
    /// Offsets were skipped or the epoch changed: subscribers missed publications.
    Gap,
}

/// One publication read back from history.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryEntry {
    /// Its offset in the stream.
    pub offset: u64,
    /// The payload as published.
    pub payload: Bytes,
}

/// A page of a topic's history (see
/// [`WebsocketService::history`](crate::ws::service::WebsocketService::history)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HistoryPage {
    /// The stream's top now: the position of its last publication (offset 0 before the first).
    pub top: Position,
    /// The publications, oldest first (newest first when asked in reverse).
    pub publications: Vec<HistoryEntry>,
}

/// Limits of one recovery.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecoveryLimits {
    /// Most publications one recovery re-sends.
    pub(crate) count: usize,
    /// Most bytes (frames) one recovery re-sends: under the outbound queue bound, so a
    /// recovery never meets the slow-consumer policy by itself.
    pub(crate) bytes: usize,
}

/// What a subscribe with or without a position gets.
#[derive(Debug)]
pub(crate) struct Recovery {
    pub(crate) subscribed: Subscribed,
    /// The `rtk1` frames of the recovered publications, in order (empty unless recovered).
    pub(crate) frames: Vec<Bytes>,
}

/// Decides a topic's policy; called when a topic without a stream is published to or
/// subscribed to.
pub(crate) type PolicyRule = Arc<dyn Fn(&str) -> Option<TopicPolicy> + Send + Sync>;

#[derive(Debug)]
struct Entry {
    offset: u64,
    at: Instant,
    /// The plain frames only: a compressed frame made for live subscribers is not kept, so
    /// the byte cap counts exactly what history holds (a recovery re-sends plain frames, which
    /// RFC 7692 allows on a compressed connection).
    frames: Kept,
}

/// A kept publication's plain frames: verbatim, and `rtk1` if it was framed for `rtk1`.
#[derive(Debug)]
struct Kept {
    verbatim: Bytes,
    rtk1: Option<Bytes>,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.frames.verbatim.len() + self.frames.rtk1.as_ref().map_or(0, Bytes::len)
    }
}

#[derive(Debug)]
struct Stream {
    /// The topic, as keyed in the map (shared with the byte cap's order).
    name: Arc<str>,
    policy: TopicPolicy,
    epoch: Arc<str>,
    top: u64,
    entries: VecDeque<Entry>,
    /// When the stream last changed (created or published to).
    touched: Instant,
}

impl Stream {
    fn position(&self) -> Position {
        Position {
            offset: self.top,
            epoch: self.epoch.to_string(),
        }
    }

    /// The first offset still kept (top + 1 when none is).
    fn first(&self) -> u64 {
        self.entries.front().map_or(self.top + 1, |e| e.offset)
    }
}

/// The in-process history of every positioned topic. Owned by the dispatcher task.
pub(crate) struct Streams {
    rule: Option<PolicyRule>,
    streams: AHashMap<Arc<str>, Stream>,
    /// Every kept publication in the order they were kept, for the global byte cap. Entries
    /// already trimmed by their stream are skipped when reached, and the deque is compacted
    /// when they are more than half of it.
    order: VecDeque<(Arc<str>, u64)>,
    kept: usize,
    bytes: usize,
    max_bytes: usize,
    /// Positions are assigned elsewhere (Redis) and taken with [`observe`](Self::observe): a
    /// stream this instance has not seen a publication of yet has an empty epoch.
    external: bool,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("streams", &self.streams.len())
            .field("kept", &self.kept)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Streams {
    pub(crate) fn new(rule: Option<PolicyRule>, max_bytes: usize) -> Self {
        Self {
            rule,
            streams: AHashMap::new(),
            order: VecDeque::new(),
            kept: 0,
            bytes: 0,
            max_bytes,
            external: false,
        }
    }

    /// Streams whose positions are assigned elsewhere (see [`observe`](Self::observe)).
    pub(crate) fn external(mut self) -> Self {
        self.external = true;
        self
    }

    /// Whether any topic can have a policy at all.
    pub(crate) fn enabled(&self) -> bool {
        self.rule.is_some()
    }

    /// The stream of `topic`, created (new epoch, top 0) if the topic has a policy.
    fn stream(&mut self, topic: &str, now: Instant) -> Option<&mut Stream> {
        if !self.streams.contains_key(topic) {
            let policy = (self.rule.as_ref()?)(topic)?;
            let name: Arc<str> = Arc::from(topic);
            self.streams.insert(
                name.clone(),
                Stream {
                    name,
                    policy,
                    epoch: if self.external {
                        Arc::from("")
                    } else {
                        new_epoch()
                    },
                    top: 0,
                    entries: VecDeque::new(),
                    touched: now,
                },
            );
        }
        self.streams.get_mut(topic)
    }

    /// Assigns the next position of `topic` (advancing its top), or `None` for a topic without
    /// a policy. The caller frames the publication and hands it to [`keep`](Self::keep).
    pub(crate) fn next_position(&mut self, topic: &str, now: Instant) -> Option<Position> {
        let stream = self.stream(topic, now)?;
        stream.top += 1;
        stream.touched = now;
        Some(stream.position())
    }

    /// Whether `topic` has a policy but this instance has seen no publication of its current
    /// stream (positions assigned elsewhere only): a recovery must first learn the epoch.
    pub(crate) fn cold(&mut self, topic: &str, now: Instant) -> bool {
        self.external && self.stream(topic, now).is_some_and(|s| s.epoch.is_empty())
    }

    /// Whether `since` (an epoch and offset) is of the epoch `topic`'s cache follows but past
    /// its top: the client got publications from another instance that this one has not
    /// received yet (positions assigned elsewhere only).
    pub(crate) fn ahead(&self, topic: &str, (epoch, offset): (&str, u64)) -> bool {
        self.external
            && self
                .streams
                .get(topic)
                .is_some_and(|s| !s.epoch.is_empty() && *s.epoch == *epoch && offset > s.top)
    }

    /// Whether `position` is of the epoch `topic`'s cache follows but at or below its top: the
    /// store handed out an offset of this epoch again (positions assigned elsewhere only).
    pub(crate) fn rolls_back(&self, topic: &str, position: &Position) -> bool {
        self.external
            && self.streams.get(topic).is_some_and(|s| {
                !s.epoch.is_empty()
                    && *s.epoch == *position.epoch
                    && s.top > 0
                    && position.offset <= s.top
            })
    }

    /// The top of `topic`'s stream if `position` is of the same epoch but skips offsets after
    /// it (positions assigned elsewhere only).
    pub(crate) fn skips(&self, topic: &str, position: &Position) -> Option<u64> {
        let stream = self.streams.get(topic)?;
        (self.external
            && !stream.epoch.is_empty()
            && *stream.epoch == *position.epoch
            && stream.top > 0
            && position.offset > stream.top + 1)
            .then_some(stream.top)
    }

    /// Takes `position`, assigned elsewhere (by Redis), as `topic`'s new top. A position of
    /// another epoch, or one that does not follow the top, starts the kept publications over
    /// ([`Observed::Gap`]): the cache never has a hole, so a recovery it cannot serve whole is
    /// refused, never partial.
    pub(crate) fn observe(&mut self, topic: &str, position: &Position, now: Instant) -> Observed {
        let Some(stream) = self.stream(topic, now) else {
            return Observed::NoPolicy;
        };
        let mut freed = (0, 0);
        let mut seen = Observed::Follows;
        if stream.epoch.is_empty() {
            // The first position this instance sees: its subscribers joined without one.
            stream.epoch = Arc::from(position.epoch.as_str());
        } else if *stream.epoch != *position.epoch || position.offset != stream.top + 1 {
            freed = (
                stream.entries.len(),
                stream.entries.iter().map(Entry::bytes).sum(),
            );
            stream.entries.clear();
            stream.epoch = Arc::from(position.epoch.as_str());
            seen = Observed::Gap;
        }
        stream.top = position.offset;
        stream.touched = now;
        self.forget(freed);
        seen
    }

    /// Keeps the frames of the publication at `offset` of `topic`, trimming the stream to its
    /// size and the store to its byte cap.
    pub(crate) fn keep(&mut self, topic: &str, offset: u64, frames: Frames, now: Instant) {
        let Some(stream) = self.streams.get_mut(topic) else {
            return;
        };
        let entry = Entry {
            offset,
            at: now,
            frames: Kept {
                verbatim: frames.verbatim.plain().clone(),
                rtk1: frames.rtk1.as_ref().map(|f| f.plain().clone()),
            },
        };
        let size = entry.bytes();
        self.bytes += size;
        self.kept += 1;
        stream.entries.push_back(entry);
        self.order.push_back((stream.name.clone(), offset));
        let mut freed = (0, 0);
        while stream.entries.len() > stream.policy.history_size {
            if let Some(old) = stream.entries.pop_front() {
                freed.0 += 1;
                freed.1 += old.bytes();
            }
        }
        self.forget(freed);
        while self.bytes > self.max_bytes {
            let Some((topic, offset)) = self.order.pop_front() else {
                break;
            };
            if let Some(stream) = self.streams.get_mut(&topic) {
                if stream.entries.front().is_some_and(|e| e.offset == offset) {
                    if let Some(old) = stream.entries.pop_front() {
                        self.kept -= 1;
                        self.bytes -= old.bytes();
                    }
                }
            }
        }
        if self.order.len() > 2 * self.kept + 64 {
            let streams = &self.streams;
            self.order
                .retain(|(topic, offset)| streams.get(topic).is_some_and(|s| *offset >= s.first()));
        }
    }

    /// Where a read of `topic`'s publications of `epoch` could go in front of its cache: the
    /// cache's first offset and how many more the stream keeps (see [`prepend`](Self::prepend)).
    pub(crate) fn room_before(&self, topic: &str, epoch: &str) -> Option<(u64, usize)> {
        let stream = self.streams.get(topic)?;
        let room = stream
            .policy
            .history_size
            .saturating_sub(stream.entries.len());
        (!stream.epoch.is_empty() && *stream.epoch == *epoch && room > 0)
            .then(|| (stream.first(), room))
    }

    /// Puts publications read back from the shared store in front of `topic`'s cache, so that
    /// the next recovery from the same offset finds them here instead of reading them again.
    /// `read` is `(offset, frames)` in order, of `epoch`; only those just before the cache's
    /// first offset count, and only if they reach it without a hole. They never push out a kept
    /// publication: as many are kept, newest first, as the stream's size and the byte cap leave
    /// room for. They expire with the cache's oldest entry (their own age is not known).
    /// Returns how many were kept.
    pub(crate) fn prepend(
        &mut self,
        topic: &str,
        epoch: &str,
        read: Vec<(u64, Frames)>,
        now: Instant,
    ) -> usize {
        let Some(stream) = self.streams.get_mut(topic) else {
            return 0;
        };
        let first = stream.first();
        let before: Vec<_> = read.into_iter().filter(|(o, _)| *o < first).collect();
        let reaches = before.last().is_some_and(|(o, _)| *o + 1 == first)
            && before.windows(2).all(|w| w[0].0 + 1 == w[1].0);
        if stream.epoch.is_empty() || *stream.epoch != *epoch || !reaches {
            return 0;
        }
        let at = stream.entries.front().map_or(now, |e| e.at);
        let mut room = stream
            .policy
            .history_size
            .saturating_sub(stream.entries.len());
        let mut added = 0;
        for (offset, frames) in before.into_iter().rev() {
            let entry = Entry {
                offset,
                at,
                frames: Kept {
                    verbatim: frames.verbatim.plain().clone(),
                    rtk1: frames.rtk1.as_ref().map(|f| f.plain().clone()),
                },
            };
            let size = entry.bytes();
            if room == 0 || self.bytes + size > self.max_bytes {
                break;
            }
            room -= 1;
            self.bytes += size;
            self.kept += 1;
            stream.entries.push_front(entry);
            // The oldest kept: first in the byte cap's order too.
            self.order.push_front((stream.name.clone(), offset));
            added += 1;
        }
        added
    }

    /// Accounts for `(count, bytes)` of publications trimmed from their stream.
    fn forget(&mut self, (count, bytes): (usize, usize)) {
        self.kept -= count;
        self.bytes -= bytes;
    }

    /// Drops publications past their TTL from `stream`; returns what was freed.
    fn expire(stream: &mut Stream, now: Instant) -> (usize, usize) {
        let mut freed = (0, 0);
        while stream
            .entries
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.at) >= stream.policy.history_ttl)
        {
            if let Some(old) = stream.entries.pop_front() {
                freed.0 += 1;
                freed.1 += old.bytes();
            }
        }
        freed
    }

    /// [`recover_with`](Self::recover_with) without a head read from the shared store (the
    /// tests' entry).
    #[cfg(test)]
    pub(crate) fn recover(
        &mut self,
        topic: &str,
        since: Option<(&str, u64)>,
        limits: RecoveryLimits,
        now: Instant,
    ) -> Recovery {
        self.recover_with(topic, since, None, limits, now)
    }

    /// The range a recovery from `since` lacks at the head of `topic`'s cache, `(from, to)`
    /// inclusive, when the rest is there: same epoch (a stream this instance saw publications
    /// of), not too many missed. Positions assigned elsewhere only: that range can be read back
    /// from the shared store.
    pub(crate) fn missing_head(
        &mut self,
        topic: &str,
        (epoch, offset): (&str, u64),
        limits: RecoveryLimits,
        now: Instant,
    ) -> Option<(u64, u64)> {
        if !self.external {
            return None;
        }
        let stream = self.stream(topic, now)?;
        let freed = Self::expire(stream, now);
        let first = stream.first();
        let fits = !stream.epoch.is_empty()
            && epoch == &*stream.epoch
            && offset <= stream.top
            && stream.top - offset <= limits.count as u64
            && offset + 1 < first;
        self.forget(freed);
        fits.then(|| (offset + 1, first - 1))
    }

    /// What a subscriber of `topic` gets with `since` (an epoch and the last offset the client
    /// has): every publication after it or none (`recovered: false`), never part of them; with
    /// `head`, the `rtk1` frames of the publications from `since`'s offset + 1 to `head.0`, read
    /// from the shared store.
    pub(crate) fn recover_with(
        &mut self,
        topic: &str,
        since: Option<(&str, u64)>,
        head: Option<(u64, Vec<Bytes>)>,
        limits: RecoveryLimits,
        now: Instant,
    ) -> Recovery {
        let was_recovering = since.is_some();
        let Some(stream) = self.stream(topic, now) else {
            return Recovery {
                subscribed: Subscribed {
                    recoverable: false,
                    epoch: String::new(),
                    offset: 0,
                    was_recovering,
                    recovered: false,
                },
                frames: Vec::new(),
            };
        };
        let freed = Self::expire(stream, now);
        let top = stream.top;
        let mut subscribed = Subscribed {
            recoverable: true,
            epoch: stream.epoch.to_string(),
            offset: top,
            was_recovering,
            recovered: false,
        };
        let mut frames = Vec::new();
        if let Some((epoch, offset)) = since {
            let missed = top.saturating_sub(offset);
            // The head read from the shared store covers offset + 1 ..= its end.
            let (after, head) = match head {
                Some((to, frames)) if to >= offset && frames.len() as u64 == to - offset => {
                    (to.min(top), frames)
                }
                Some(_) => (top + 1, Vec::new()),
                None => (offset, Vec::new()),
            };
            let recoverable = epoch == &*stream.epoch
                && offset <= top
                && after <= top
                && missed <= limits.count as u64
                && after + 1 >= stream.first();
            if recoverable {
                let cached = top - after;
                let skip = stream.entries.len() - cached as usize;
                let mut bytes = head.iter().map(Bytes::len).sum::<usize>();
                frames = head;
                frames.truncate((after - offset) as usize);
                for e in stream.entries.iter().skip(skip) {
                    if let Some(f) = &e.frames.rtk1 {
                        bytes += f.len();
                        frames.push(f.clone());
                    }
                }
                if bytes <= limits.bytes && frames.len() as u64 == missed {
                    subscribed.recovered = true;
                    // The recovered publications follow: the client has `offset` until then.
                    subscribed.offset = offset;
                } else {
                    frames.clear();
                }
            }
        }
        self.forget(freed);
        Recovery { subscribed, frames }
    }

    /// The position of `topic`'s last publication (creating its stream if it has a policy).
    pub(crate) fn top(&mut self, topic: &str, now: Instant) -> Option<Position> {
        self.stream(topic, now).map(|s| s.position())
    }

    /// Up to `limit` publications of `topic` after offset `since` (from the oldest kept
    /// without), oldest first; with `reverse`, the newest ones (before `since` if given),
    /// newest first. `None` for a topic without a policy.
    pub(crate) fn page(
        &mut self,
        topic: &str,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
        now: Instant,
    ) -> Option<HistoryPage> {
        let stream = self.stream(topic, now)?;
        let freed = Self::expire(stream, now);
        let entry = |e: &Entry| HistoryEntry {
            offset: e.offset,
            payload: frame::encoded_payload(&e.frames.verbatim)
                .map(|p| e.frames.verbatim.slice_ref(p))
                .unwrap_or_default(),
        };
        let publications = if reverse {
            let before = since.unwrap_or(u64::MAX);
            stream
                .entries
                .iter()
                .rev()
                .filter(|e| e.offset < before)
                .take(limit)
                .map(entry)
                .collect()
        } else {
            let after = since.unwrap_or(0);
            stream
                .entries
                .iter()
                .filter(|e| e.offset > after)
                .take(limit)
                .map(entry)
                .collect()
        };
        let top = stream.position();
        self.forget(freed);
        Some(HistoryPage { top, publications })
    }

    /// Forgets `topic`'s stream: its publications and its identity. The next publication or
    /// subscription starts a new epoch, so positions of the old one no longer recover.
    pub(crate) fn remove(&mut self, topic: &str) -> bool {
        match self.streams.remove(topic) {
            Some(stream) => {
                let freed = (
                    stream.entries.len(),
                    stream.entries.iter().map(Entry::bytes).sum(),
                );
                self.forget(freed);
                true
            }
            None => false,
        }
    }

    /// Drops publications past their TTL, streams whose epoch outlived its TTL, and streams
    /// never published to that are older than the history TTL.
    pub(crate) fn sweep(&mut self, now: Instant) {
        let mut freed = (0, 0);
        self.streams.retain(|_, stream| {
            let f = Self::expire(stream, now);
            freed.0 += f.0;
            freed.1 += f.1;
            // A stream nothing was published to yet (a subscriber or `stream_top` created
            // it) is kept only as long as a publication would be: clients choose topic names,
            // and those streams must not pile up for the epoch's lifetime.
            let lifetime = if stream.top == 0 {
                stream.policy.history_ttl
            } else {
                stream.policy.epoch_ttl
            };
            !stream.entries.is_empty() || now.saturating_duration_since(stream.touched) < lifetime
        });
        self.forget(freed);
    }
}

/// A new epoch: 8 random characters from `[0-9a-z]`.
pub(crate) fn new_epoch() -> Arc<str> {
    let mut n = uuid::Uuid::new_v4().as_u64_pair().0;
    let mut s = String::with_capacity(8);
    for _ in 0..8 {
        s.push(char::from_digit((n % 36) as u32, 36).unwrap_or('0'));
        n /= 36;
    }
    Arc::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deflate::PublicationFrames;

    fn frames(n: u64) -> Frames {
        Frames {
            verbatim: PublicationFrames::new(frame::encode_text(n.to_string().as_bytes())),
            rtk1: Some(PublicationFrames::new(frame::encode_text(
                format!("{{\"o\":{n}}}").as_bytes(),
            ))),
            positioned: true,
        }
    }

    fn streams(size: usize, max_bytes: usize) -> Streams {
        let rule: PolicyRule = Arc::new(move |t: &str| {
            t.starts_with("pos")
                .then(|| TopicPolicy::history(size, Duration::from_secs(60)))
        });
        Streams::new(Some(rule), max_bytes)
    }

    fn publish(s: &mut Streams, topic: &str, now: Instant) -> Option<Position> {
        let p = s.next_position(topic, now)?;
        s.keep(topic, p.offset, frames(p.offset), now);
        Some(p)
    }

    const LIMITS: RecoveryLimits = RecoveryLimits {
        count: 300,
        bytes: 1 << 20,
    };

    #[test]
    fn recovery_is_all_or_nothing() {
        let now = Instant::now();
        let mut s = streams(10, usize::MAX);
        assert_eq!(publish(&mut s, "plain", now), None);
        let mut epoch = String::new();
        for n in 1..=15 {
            let p = publish(&mut s, "pos", now).unwrap();
            assert_eq!(p.offset, n);
            epoch = p.epoch;
        }
        // Offsets 6..=15 are kept: from 5 everything is there.
        let r = s.recover("pos", Some((&epoch, 5)), LIMITS, now);
        assert!(r.subscribed.recovered);
        assert_eq!(r.subscribed.offset, 5);
        assert_eq!(r.frames.len(), 10);
        // From 4, offset 5 is gone: nothing.
        let r = s.recover("pos", Some((&epoch, 4)), LIMITS, now);
        assert!(!r.subscribed.recovered && r.frames.is_empty());
        assert_eq!(r.subscribed.offset, 15);
        // Another epoch, an offset past the top, more than the limit: nothing.
        for since in [("other", 10), (epoch.as_str(), 16)] {
            let r = s.recover("pos", Some(since), LIMITS, now);
            assert!(!r.subscribed.recovered && r.frames.is_empty());
        }
        let few = RecoveryLimits { count: 3, ..LIMITS };
        let r = s.recover("pos", Some((&epoch, 10)), few, now);
        assert!(!r.subscribed.recovered && r.frames.is_empty());
        // Nothing missed: recovered with nothing to send.
        let r = s.recover("pos", Some((&epoch, 15)), LIMITS, now);
        assert!(r.subscribed.recovered && r.frames.is_empty());
        // Expired: nothing.
        let later = now + Duration::from_secs(61);
        let r = s.recover("pos", Some((&epoch, 14)), LIMITS, later);
        assert!(!r.subscribed.recovered && r.frames.is_empty());
        assert_eq!((s.kept, s.bytes), (0, 0));
    }

    #[test]
    fn sweeping_forgets_expired_epochs_and_unused_streams() {
        let now = Instant::now();
        let mut s = streams(10, usize::MAX);
        let used = publish(&mut s, "pos-used", now).unwrap();
        assert_eq!(s.top("pos-idle", now).unwrap().offset, 0);
        // Past the history TTL: the publication is gone, the epoch stays; the idle stream goes.
        s.sweep(now + Duration::from_secs(61));
        assert_eq!((s.kept, s.streams.len()), (0, 1));
        assert_eq!(s.top("pos-used", now).unwrap(), used);
        // Past the epoch's lifetime: a new epoch.
        s.sweep(now + Duration::from_secs(25 * 3600));
        assert!(s.streams.is_empty());
        assert_ne!(s.top("pos-used", now).unwrap().epoch, used.epoch);
    }

    #[test]
    fn the_byte_cap_drops_the_oldest_publications_of_any_stream() {
        let now = Instant::now();
        let one = frames(1).verbatim.plain().len() + frames(1).rtk1.unwrap().plain().len();
        let mut s = streams(1000, 10 * one);
        for _ in 0..8 {
            publish(&mut s, "pos-a", now);
        }
        for _ in 0..8 {
            publish(&mut s, "pos-b", now);
        }
        assert!(s.bytes <= 10 * one);
        assert_eq!(s.streams["pos-a"].first(), 7, "six of pa's dropped first");
        assert_eq!(s.streams["pos-b"].first(), 1);
        assert!(s.remove("pos-a"));
        assert_eq!(s.kept, 8);
        let p = publish(&mut s, "pos-a", now).unwrap();
        assert_eq!(p.offset, 1, "a removed stream starts a new epoch");
        for _ in 0..10_000 {
            publish(&mut s, "pos-b", now);
        }
        assert!(s.order.len() <= 2 * s.kept + 64);
    }
    /// An instance that learns positions from elsewhere, and first sees offsets 101..=120.
    fn seeing_101_to_120(size: usize, max_bytes: usize, now: Instant) -> Streams {
        let mut s = streams(size, max_bytes).external();
        for offset in 101..=120 {
            let p = Position {
                offset,
                epoch: "e1".into(),
            };
            s.observe("pos", &p, now);
            s.keep("pos", offset, frames(offset), now);
        }
        s
    }

    fn read(offsets: std::ops::RangeInclusive<u64>) -> Vec<(u64, Frames)> {
        offsets.map(|o| (o, frames(o))).collect()
    }

    #[test]
    fn a_range_read_back_goes_in_front_of_the_cache() {
        let now = Instant::now();
        let mut s = seeing_101_to_120(150, usize::MAX, now);
        let from_50 = |s: &mut Streams| s.missing_head("pos", ("e1", 50), LIMITS, now);
        assert_eq!(from_50(&mut s), Some((51, 100)));

        // Another epoch, a read with a hole, or one that stops short of the cache: not kept.
        assert_eq!(s.prepend("pos", "e0", read(51..=100), now), 0);
        let mut holed = read(51..=100);
        holed.remove(10);
        assert_eq!(s.prepend("pos", "e1", holed, now), 0);
        assert_eq!(s.prepend("pos", "e1", read(51..=99), now), 0);
        assert_eq!(from_50(&mut s), Some((51, 100)));

        // Reaching the cache (what overlaps it is ignored): kept, and a recovery from 50 is
        // served whole from memory, in order.
        assert_eq!(s.prepend("pos", "e1", read(51..=110), now), 50);
        assert_eq!(from_50(&mut s), None);
        let r = s.recover("pos", Some(("e1", 50)), LIMITS, now);
        assert!(r.subscribed.recovered);
        let rtk1 = |o: u64| frames(o).rtk1.unwrap().plain().clone();
        assert_eq!(r.frames, (51..=120).map(rtk1).collect::<Vec<_>>());
    }

    #[test]
    fn a_range_read_back_never_pushes_out_what_the_cache_holds() {
        let now = Instant::now();
        // The stream keeps 30 and holds 20: the newest 10 of the read fit.
        let mut s = seeing_101_to_120(30, usize::MAX, now);
        assert_eq!(s.prepend("pos", "e1", read(51..=100), now), 10);
        assert_eq!(
            s.missing_head("pos", ("e1", 80), LIMITS, now),
            Some((81, 90))
        );

        // The byte cap leaves room for 100, 99 and 98 (two frames each: 16, 14 and 14 bytes).
        let held = seeing_101_to_120(150, usize::MAX, now).bytes;
        let mut s = seeing_101_to_120(150, held + 16 + 2 * 14, now);
        assert_eq!(s.prepend("pos", "e1", read(51..=100), now), 3);
        assert_eq!(
            s.missing_head("pos", ("e1", 90), LIMITS, now),
            Some((91, 97))
        );
        let r = s.recover("pos", Some(("e1", 97)), LIMITS, now);
        assert!(r.subscribed.recovered);
        assert_eq!(r.frames.len(), 23);
    }
}
