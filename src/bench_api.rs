//! Thin public wrappers around crate-private internals, for the criterion benches in `benches/`
//! and the fuzz targets in `fuzz/`.
//!
//! **Not a stable API**: hidden from the docs, outside semver, and free to change with the
//! internals it wraps. Each wrapper calls the code the runtime itself runs — the frame codec, a
//! shard's topic map and deliver path, a connection's outbound queue, the dispatcher's
//! frame-once step — with no task or channel in between, so a bench measures that code alone.
//! [`spawn_connection`] is the exception: it runs a whole connection, reader and writer tasks
//! included, over any byte stream, for the fuzz targets.

use std::fmt;
use std::sync::{Arc, Weak};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::{JoinError, JoinHandle};
use uuid::Uuid;

use crate::broker::local::NoInterest;
use crate::connection::{self, Inbound, Upgraded};
use crate::deflate::PublicationFrames;
use crate::dispatch::Dispatcher;
use crate::frame;
use crate::handler::MessageHandler;
use crate::metrics::Metrics;
use crate::outbound::{Conn, WriteSide};
use crate::service::WebsocketService;
use crate::shard::{Command, Shard};

/// Encodes a final, unmasked text frame (header and payload in one buffer), as the dispatcher
/// does once per published message.
pub fn encode_text(payload: &[u8]) -> Bytes {
    frame::encode_text(payload)
}

/// Builds a final text frame as a client sends it: masked with `key`.
pub fn masked_client_frame(payload: &[u8], key: [u8; 4]) -> BytesMut {
    frame::encode_client(true, 0x1, payload, Some(key))
}

/// Builds any frame as a client would send it: `opcode` (the 4 low bits of the first byte, plus
/// any reserved bits a test wants set) and the FIN bit as given, the payload masked with `mask`,
/// or unmasked — a protocol violation — with `None`.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> BytesMut {
    frame::encode_client(fin, opcode, payload, mask)
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

    /// Like [`parse`](Self::parse), but returns the whole frame (final bit, opcode, payload),
    /// ready for a [`MessageAssembler`].
    pub fn parse_frame(&self, buf: &mut BytesMut) -> Result<Option<Frame>, u16> {
        match self.0.parse(buf) {
            Ok(frame) => Ok(frame.map(Frame)),
            Err(e) => Err(e.code),
        }
    }

    /// Like [`parse_frame`](Self::parse_frame), as the reader calls it: a continuation frame
    /// that would take `assembler`'s message in progress past its limit is refused (1009) from
    /// its header.
    pub fn parse_frame_for(
        &self,
        buf: &mut BytesMut,
        assembler: &MessageAssembler,
    ) -> Result<Option<Frame>, u16> {
        match self.0.parse_for(buf, assembler.0.continuation_room()) {
            Ok(frame) => Ok(frame.map(Frame)),
            Err(e) => Err(e.code),
        }
    }
}

/// One parsed and unmasked client frame.
#[derive(Debug)]
pub struct Frame(frame::Frame);

impl Frame {
    /// Whether the frame's FIN bit is set.
    pub fn fin(&self) -> bool {
        self.0.fin
    }

    /// The opcode, as on the wire (`0x0` continuation … `0xA` pong).
    pub fn opcode(&self) -> u8 {
        match self.0.opcode {
            frame::OpCode::Continuation => 0x0,
            frame::OpCode::Text => 0x1,
            frame::OpCode::Binary => 0x2,
            frame::OpCode::Close => 0x8,
            frame::OpCode::Ping => 0x9,
            frame::OpCode::Pong => 0xA,
        }
    }

    /// Whether it is a control frame (close, ping, pong), which the reader handles itself
    /// instead of passing it to the [`MessageAssembler`].
    pub fn is_control(&self) -> bool {
        self.0.opcode.is_control()
    }

    /// The unmasked payload.
    pub fn payload(&self) -> &[u8] {
        &self.0.payload
    }
}

/// The opcode bits and total size (header and payload) of the frame at the start of `buf`, from
/// its header alone and unvalidated; `None` until the header is complete. The reader uses it to
/// skip input after the server closed.
pub fn peek_extent(buf: &[u8]) -> Option<(u8, u64)> {
    frame::peek_extent(buf)
}

/// Checks a received close frame's payload as the reader does: `Ok(code)` to echo (`None` for
/// an empty body), `Err(close_code)` for a protocol violation.
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<u16>, u16> {
    frame::parse_close_payload(payload).map_err(|e| e.code)
}

/// A complete data message out of a [`MessageAssembler`].
#[derive(Debug)]
pub enum Message {
    /// A text message, checked to be UTF-8.
    Text(BytesMut),
    /// A binary message.
    Binary(BytesMut),
}

/// The connection reader's message assembler: joins fragments under a total size cap and checks
/// that text is UTF-8.
#[derive(Debug)]
pub struct MessageAssembler(frame::MessageAssembler);

impl MessageAssembler {
    /// An assembler refusing messages larger than `max_message` bytes in total.
    pub fn new(max_message: usize) -> Self {
        Self(frame::MessageAssembler::new(max_message))
    }

    /// Feeds one data frame (text, binary or continuation): `Ok(Some(message))` once a message
    /// is complete, `Ok(None)` while one is in progress, `Err(close_code)` for a violation.
    ///
    /// # Panics
    /// If `frame` is a control frame: the reader never passes one here.
    pub fn push(&mut self, frame: Frame) -> Result<Option<Message>, u16> {
        assert!(!frame.is_control(), "control frames are not assembled");
        match self.0.push(frame.0) {
            Ok(None) => Ok(None),
            Ok(Some(frame::Message::Text(t))) => Ok(Some(Message::Text(t))),
            Ok(Some(frame::Message::Binary(b))) => Ok(Some(Message::Binary(b))),
            Err(e) => Err(e.code),
        }
    }

    /// What the reader does while no frame is complete: if `buf` starts with a text frame whose
    /// payload is still arriving, validates the UTF-8 received since the previous call (RFC 6455
    /// §8.1 fail fast). `Err(1007)` for text no further bytes could make valid. Until that frame
    /// is [`push`](Self::push)ed, `buf` must start with the same frame.
    pub fn check_arriving(&mut self, buf: &[u8]) -> Result<(), u16> {
        match frame::incomplete_frame(buf) {
            Some((opcode, key, masked)) => self
                .0
                .check_incomplete(opcode, key, masked)
                .map_err(|e| e.code),
            None => Ok(()),
        }
    }

    /// How many bytes were passed to the UTF-8 validator so far (each payload byte of a text
    /// message once, however it arrived).
    pub fn utf8_bytes_fed(&self) -> u64 {
        self.0.utf8_bytes_fed()
    }
}

/// A connection started by [`spawn_connection`].
#[derive(Debug)]
pub struct ConnectionTask {
    task: JoinHandle<()>,
    conn: Weak<Conn>,
}

impl ConnectionTask {
    /// Waits until the connection has ended: its reader task returned, after `on_disconnect`.
    /// Cancel-safe: it can be raced against a timeout and awaited again.
    pub async fn finished(&mut self) -> Result<(), JoinError> {
        (&mut self.task).await
    }

    /// Whether the connection task has returned.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Whether every reference to the connection's shared state (its outbound queue, held by
    /// its tasks, its sinks and its shard's topic map) is gone. After the connection ended, this
    /// turns true once its shard has processed the removal; if it never does, the connection
    /// leaked.
    pub fn is_released(&self) -> bool {
        self.conn.strong_count() == 0
    }
}

/// Runs one connection of `service` over `read` and `write` as if it had just been upgraded:
/// admits it, subscribes it to `topic`, and spawns the task the server runs for every upgraded
/// connection, with `pre_read` as the bytes the client sent along with
/// the upgrade request. `None` (nothing spawned) while the service is shutting down or at its
/// connection limit.
///
/// Must be called inside the tokio runtime the service was built in.
pub async fn spawn_connection<H, R, W>(
    service: &Arc<WebsocketService<H>>,
    topic: &str,
    user_id: H::UserId,
    pre_read: &[u8],
    read: R,
    write: W,
) -> Option<ConnectionTask>
where
    H: MessageHandler,
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let admitted = connection::admit(service).ok()?;
    let socket = Upgraded {
        read: Inbound::Other(Box::new(read)),
        pre_read: BytesMut::from(pre_read),
        write: WriteSide::Other(Box::new(write)),
    };
    // The same path as `upgrade_handler`'s: subscribed first, then run in a task of its own.
    let spawned = admitted
        .join_and_spawn(topic.to_owned(), user_id, async move { Some(socket) })
        .await;
    Some(ConnectionTask {
        task: spawned.task,
        conn: spawned.conn,
    })
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
        self.0
            .deliver(topic, &PublicationFrames::new(frame.clone()), None);
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
        self.0.frame_for(payload).plain().clone()
    }
}

/// A router that accepts every topic for one fixed user: `GET /ws/{topic}` upgrades through
/// [`upgrade_handler`](crate::ws::upgrade::upgrade_handler) with a validator that always says
/// yes, and no token is asked for. For tests and tools only: a real application authenticates
/// and authorizes.
pub fn open_router<H: crate::ws::handler::MessageHandler>(
    service: std::sync::Arc<crate::ws::service::WebsocketService<H>>,
    user: H::UserId,
) -> axum::Router {
    use axum::extract::{Path, State};
    let route = move |ws: crate::ws::upgrade::WebSocketUpgrade,
                      service: State<std::sync::Arc<crate::ws::service::WebsocketService<H>>>,
                      Path(topic): Path<String>| async move {
        let always = |_, _, _| async { Ok(()) };
        crate::ws::upgrade::upgrade_handler(ws, service, user, topic, always).await
    };
    axum::Router::new()
        .route("/ws/{topic}", axum::routing::get(route))
        .with_state(service)
}

/// The Redis side of an instance with nothing behind it: the runtime's own subscriber and
/// publisher connections, feeding what the subscriber receives into a channel of the same
/// capacity as the dispatcher's, which [`recv_many`](Self::recv_many) drains. For measuring the
/// Redis client alone.
#[derive(Debug)]
pub struct RedisPubSub {
    broker: crate::broker::redis::RedisBroker,
    rx: tokio::sync::mpsc::Receiver<crate::dispatch::Published>,
}

impl RedisPubSub {
    /// Connects (lazily, as the runtime does) to the Redis at `url`; channels are the topics
    /// themselves (no prefix). Must be called inside a tokio runtime.
    pub fn start(url: &str) -> Result<Self, String> {
        let (tx, rx) = tokio::sync::mpsc::channel(crate::runtime::DISPATCH_CHANNEL);
        let settings = crate::broker::RedisSettings {
            url: url.to_owned(),
            prefix: String::new(),
            tls: None,
        };
        let broker = crate::broker::redis::RedisBroker::start(
            settings,
            uuid::Uuid::new_v4().as_u128() as u64,
            tx,
            Arc::new(Metrics::default()),
        )?;
        Ok(Self { broker, rx })
    }

    /// Subscribes `topic`, as a shard does when the topic gains its first local subscriber.
    /// The subscription is batched with the others and confirmed by Redis later.
    pub fn subscribe(&self, topic: &str) {
        self.broker.interest().first_in_shard(&Arc::from(topic));
    }

    /// Publishes `payload` on `topic` through the pipelined publisher connection; resolves once
    /// Redis answered.
    pub async fn publish(&self, topic: &str, payload: Bytes) -> Result<(), String> {
        self.broker
            .publish(topic, payload)
            .await
            .map_err(|e| e.to_string())
    }

    /// Waits for at least one received message and takes up to `max` of those waiting;
    /// returns how many it took (0 once the subscriber has stopped).
    pub async fn recv_many(&mut self, max: usize) -> usize {
        let mut batch = Vec::with_capacity(max);
        self.rx.recv_many(&mut batch, max).await
    }
}

impl Drop for RedisPubSub {
    fn drop(&mut self) {
        self.broker.stop();
    }
}
