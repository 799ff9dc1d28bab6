//! Thin public wrappers around crate-private internals, for the criterion benches in `benches/`.
//!
//! **Not a stable API**: hidden from the docs, outside semver, and free to change with the
//! internals it wraps. Each wrapper calls the code the runtime itself runs — the frame codec, a
//! shard's topic map and deliver path, a connection's outbound queue, the dispatcher's
//! frame-once step — with no task or channel in between, so a bench measures that code alone.

use std::fmt;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use uuid::Uuid;

use crate::broker::local::NoInterest;
use crate::frame;
use crate::metrics::Metrics;
use crate::outbound::Conn;
use crate::shard::{Command, Dispatcher, Shard};

/// Encodes a final, unmasked text frame (header and payload in one buffer), as the dispatcher
/// does once per published message.
pub fn encode_text(payload: &[u8]) -> Bytes {
    frame::encode_text(payload)
}

/// Builds a final text frame as a client sends it: masked with `key`.
pub fn masked_client_frame(payload: &[u8], key: [u8; 4]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(14 + payload.len());
    buf.put_u8(0x81);
    let len = payload.len();
    if len < 126 {
        buf.put_u8(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        buf.put_u8(0x80 | 126);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(0x80 | 127);
        buf.put_u64(len as u64);
    }
    buf.put_slice(&key);
    let start = buf.len();
    buf.put_slice(payload);
    frame::apply_mask(&mut buf[start..], key);
    buf
}

/// The connection reader's frame parser: validates a client frame's header and unmasks its
/// payload in place.
#[derive(Debug)]
pub struct FrameParser(frame::FrameParser);

impl FrameParser {
    /// A parser refusing frames whose payload is larger than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self(frame::FrameParser::new(max_frame))
    }

    /// Takes one complete frame off the front of `buf` and returns its unmasked payload;
    /// `Ok(None)` if more bytes are needed, `Err(close_code)` for a protocol violation.
    pub fn parse(&self, buf: &mut BytesMut) -> Result<Option<BytesMut>, u16> {
        match self.0.parse(buf) {
            Ok(frame) => Ok(frame.map(|f| f.payload)),
            Err(e) => Err(e.code),
        }
    }
}

/// One in-memory connection: its byte-bounded outbound queue, with no socket or writer task.
#[derive(Debug, Clone)]
pub struct Subscriber(Arc<Conn>);

impl Subscriber {
    /// A connection with id `id` whose queue holds at most `max_queue_bytes` of frames.
    pub fn new(id: u128, max_queue_bytes: usize) -> Self {
        Self(Arc::new(Conn::new(
            Uuid::from_u128(id),
            0,
            max_queue_bytes,
            crate::outbound::SlowConsumerPolicy::Close,
        )))
    }

    /// Does what the writer does with one wake-up, minus the write: takes everything queued into
    /// `batch`, then drops it (a refcount decrement per frame). Returns how many frames it took.
    pub fn drain(&self, batch: &mut Vec<Bytes>) -> usize {
        self.0.take(batch);
        let n = batch.len();
        batch.clear();
        n
    }
}

/// One shard's topic map, driven directly: the methods below are what the shard task does for
/// each command, without the task or its channel.
pub struct TopicMap(Shard);

impl fmt::Debug for TopicMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopicMap")
            .field("topics", &self.0.topic_count())
            .finish_non_exhaustive()
    }
}

impl Default for TopicMap {
    fn default() -> Self {
        Self::new()
    }
}

impl TopicMap {
    /// An empty map, with the in-process broker's (no-op) topic interest.
    pub fn new() -> Self {
        Self(Shard::detached(
            Arc::new(NoInterest),
            Arc::new(Metrics::default()),
        ))
    }

    /// Adds `sub` to `topic`: the map work of a `Subscribe` command, without its acknowledgement
    /// channel.
    pub fn subscribe(&mut self, sub: &Subscriber, topic: Arc<str>) {
        self.0.subscribe(sub.0.clone(), topic);
    }

    /// Removes `sub` from one topic: an `Unsubscribe` command.
    pub fn unsubscribe(&mut self, sub: &Subscriber, topic: Arc<str>) {
        self.0.apply(Command::Unsubscribe {
            conn_id: sub.0.id,
            topic,
        });
    }

    /// Removes `sub` from every topic it joined: a `Remove` command (a connection leaving).
    pub fn remove(&mut self, sub: &Subscriber) {
        self.0.apply(Command::Remove { conn_id: sub.0.id });
    }

    /// How many local subscribers `topic` has (`None` if it has none): the lookup a delivery
    /// starts with.
    pub fn lookup(&self, topic: &str) -> Option<usize> {
        self.0.subscribers(topic).map(<[_]>::len)
    }

    /// Pushes `frame` to every local subscriber of `topic` (a refcount and a queue push each):
    /// the shard's `Deliver` path.
    pub fn deliver(&mut self, topic: &str, frame: &Bytes) {
        self.0.deliver(topic, frame);
    }

    /// How many topics have at least one subscriber.
    pub fn topic_count(&self) -> usize {
        self.0.topic_count()
    }
}

/// The dispatcher's frame-once step, with no shards behind it.
#[derive(Debug)]
pub struct FrameDeduper(Dispatcher);

impl Default for FrameDeduper {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDeduper {
    /// A dispatcher that has framed nothing yet.
    pub fn new() -> Self {
        Self(Dispatcher::new(Arc::from(Vec::new())))
    }

    /// Frames `payload`, or reuses the previous frame if the previous payload was identical:
    /// `Dispatcher::frame_for`.
    pub fn frame_for(&mut self, payload: &Bytes) -> Bytes {
        self.0.frame_for(payload)
    }
}
