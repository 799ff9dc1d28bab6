//! Each connection's outbound queue and the writer task that drains it.
//!
//! The queue holds complete, pre-encoded frames ([`Bytes`]): a broadcast frame is shared by every
//! subscriber, so queuing it costs a refcount and a slot, never a copy. The queue is bounded in
//! **bytes**; a push that would pass the bound triggers the slow-consumer policy instead of growing.
//!
//! # Guards
//! `Conn::state` is a `std::sync::Mutex`: it is only held to push or to swap the queue out, never
//! across an `.await`, and it is contended by at most one shard and the connection's own tasks —
//! never by two shards, because a connection belongs to exactly one shard.
//!
//! # Batching
//! The writer wakes when the queue goes from empty to non-empty, optionally waits `write_delay`
//! for more frames to collect, then takes **everything** queued and sends it in vectored writes.
//! Under load the writer wakes less often than frames arrive, so batches form by themselves.
//!
//! # Direct writes
//! A TCP connection whose writer is idle, whose queue is empty and which is not batching
//! ([`loaded`]) gets a delivered frame written by the shard itself, with one non-blocking
//! `write` under the connection's lock ([`Conn::push_or_write`]). At low rates that is every
//! delivery, and it saves what the queue costs per frame: waking the writer task, polling it,
//! taking the frame back out. Whatever the socket does not take is queued for the writer, which
//! then owns the socket until its queue is empty again. Writes never overlap: the shard writes
//! only under the lock and only while the writer holds nothing it has not finished writing.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::frame;
use crate::metrics::Metrics;

/// What a connection whose client reads too slowly gets, once its outbound queue would pass its
/// byte bound ([`outbound_queue_bytes`](crate::WebsocketServiceBuilder::outbound_queue_bytes)).
///
/// ## Lagging
/// A client that reads slower than messages arrive falls behind; its queue grows until the
/// bound. What happens then is decided per connection, and never slows other clients or the
/// shard delivering to it:
/// - [`Close`](Self::Close) (default): everything queued is dropped and the client receives a
///   close frame with code 1008 (`"slow consumer: outbound queue full"`). Counted in
///   `slow_consumer_closes`. The client knows it missed messages and can reconnect and resync.
/// - [`DropOldest`](Self::DropOldest): the oldest queued messages are dropped until the new one
///   fits; the connection stays open. The client silently misses a run of messages (a gap), then
///   continues with the newest ones. Counted in `slow_consumer_drops`.
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

/// What happened to a frame handed to [`Conn::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    /// Queued for the writer.
    Queued,
    /// Queued, after dropping this many older frames (policies `DropOldest`, `LatestPerTopic`).
    QueuedDropping(u64),
    /// Written straight to the socket: this many bytes of it. Any rest is queued first.
    Written(usize),
    /// The connection is closing or gone; the frame was dropped.
    Closed,
    /// The frame would pass the queue's byte bound: the queue was cleared and the connection is
    /// being closed with 1008 (slow-consumer policy `Close`).
    Overflow,
}

/// Most control frames of one kind (pong, ping) waiting to be written.
const MAX_PENDING_CONTROL: usize = 16;

/// A queued frame's topic, for conflation: the address of the shard's interned topic name, or
/// [`NO_TOPIC`] for direct frames. Only compared, never dereferenced.
pub(crate) type TopicKey = usize;
pub(crate) const NO_TOPIC: TopicKey = 0;

#[derive(Debug, Default)]
struct State {
    /// Data frames with their topic, in delivery order.
    data: VecDeque<(TopicKey, Bytes)>,
    /// Sum of `data` lengths.
    data_bytes: usize,
    /// Control frames (pongs, heartbeat pings) the writer sends before queued data: at most
    /// [`MAX_PENDING_CONTROL`] of each kind, the newest, so a ping flood cannot grow it.
    control: Vec<Bytes>,
    /// Close frame to send once `data` is written; after it nothing else is accepted.
    close: Option<Bytes>,
    /// The socket, for direct writes (TCP only, and only until the writer ends).
    direct: Option<Direct>,
    /// The rest of a frame a direct write left unfinished: written before anything else, and
    /// never dropped by a slow-consumer policy (the stream would lose its framing).
    partial: Option<Bytes>,
    /// The writer has taken frames it has not finished writing: no direct write meanwhile.
    writing: bool,
    /// When the last write finished and how many frames it carried (see [`loaded`]).
    last_write: Option<(Instant, usize)>,
}

impl State {
    /// Whether anything waits to be written: a partial frame's rest, control frames or data.
    fn pending(&self) -> bool {
        self.partial.is_some() || !self.control.is_empty() || !self.data.is_empty()
    }

    /// Whether the connection batches at `now` (see [`loaded`]). Never while a direct write's
    /// rest is pending: the socket was full, and nothing may be written before that rest anyway,
    /// so waiting would only delay the frame it belongs to.
    fn batching(&self, now: Instant, write_delay: Duration) -> bool {
        self.partial.is_none()
            && self
                .last_write
                .is_some_and(|(at, n)| loaded(now.saturating_duration_since(at), n, write_delay))
    }
}

/// What a direct write needs: the socket, and the writer's delay for [`loaded`].
#[derive(Debug)]
struct Direct {
    socket: Arc<TcpStream>,
    write_delay: Duration,
}

/// The shared part of one connection: its outbound queue and the signals between its tasks.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) id: Uuid,
    /// Index of the shard that owns this connection.
    pub(crate) shard: usize,
    max_queue_bytes: usize,
    policy: SlowConsumerPolicy,
    state: Mutex<State>,
    /// Wakes the writer. `notify_one` keeps a permit, so a push between the writer's drain and
    /// its next wait is never missed.
    writer_wake: Notify,
    /// Set once the connection must end (close queued, or the socket failed); wakes the reader.
    ending: AtomicBool,
    reader_wake: Notify,
}

impl Conn {
    pub(crate) fn new(
        id: Uuid,
        shard: usize,
        max_queue_bytes: usize,
        policy: SlowConsumerPolicy,
    ) -> Self {
        Self {
            id,
            shard,
            max_queue_bytes,
            policy,
            state: Mutex::new(State::default()),
            writer_wake: Notify::new(),
            ending: AtomicBool::new(false),
            reader_wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the guard is held cannot leave `State` inconsistent (every update is a
        // single push or swap), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a data frame of `topic` (or [`NO_TOPIC`]). Never blocks and never awaits: safe on
    /// the dispatch path. Past the byte bound, the slow-consumer policy decides.
    pub(crate) fn push(&self, frame: Bytes, topic: TopicKey) -> Push {
        self.push_locked(self.lock(), frame, topic)
    }

    /// Like [`push`](Self::push), but writes the frame to the socket at once when nothing is
    /// waiting to be written, the writer is idle, and the connection is not batching (`now`
    /// against its last write, see [`loaded`]). Never blocks: a socket that does not take the
    /// whole frame gets the rest queued for the writer.
    pub(crate) fn push_or_write(&self, frame: Bytes, topic: TopicKey, now: Instant) -> Push {
        let mut st = self.lock();
        let idle = !st.writing && !st.pending() && st.close.is_none();
        if let Some(direct) = st.direct.as_ref().filter(|_| idle) {
            if !st.batching(now, direct.write_delay) {
                match direct.socket.try_write(&frame) {
                    Ok(n) => {
                        st.last_write = Some((now, 1));
                        if n < frame.len() {
                            st.partial = Some(frame.slice(n..));
                            drop(st);
                            self.writer_wake.notify_one();
                        }
                        return Push::Written(n);
                    }
                    // Full: the writer waits for room.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        drop(st);
                        tracing::debug!(conn_id = %self.id, error = %e, "write failed");
                        self.fail();
                        return Push::Closed;
                    }
                }
            }
        }
        self.push_locked(st, frame, topic)
    }

    fn push_locked(&self, mut st: MutexGuard<'_, State>, frame: Bytes, topic: TopicKey) -> Push {
        if st.close.is_some() {
            return Push::Closed;
        }
        let mut dropped = 0u64;
        if st.data_bytes + frame.len() > self.max_queue_bytes
            && self.policy == SlowConsumerPolicy::LatestPerTopic
        {
            dropped += conflate(&mut st, topic);
        }
        if st.data_bytes + frame.len() > self.max_queue_bytes {
            match self.policy {
                SlowConsumerPolicy::Close => {
                    st.data.clear();
                    st.data_bytes = 0;
                    st.close = Some(frame::encode_close(
                        frame::close_code::POLICY_VIOLATION,
                        "slow consumer: outbound queue full",
                    ));
                    drop(st);
                    self.wake_all();
                    return Push::Overflow;
                }
                SlowConsumerPolicy::DropOldest | SlowConsumerPolicy::LatestPerTopic => {
                    while st.data_bytes + frame.len() > self.max_queue_bytes {
                        match st.data.pop_front() {
                            Some((_, old)) => {
                                st.data_bytes -= old.len();
                                dropped += 1;
                            }
                            // The frame alone is larger than the bound: it is the one dropped.
                            None => return Push::QueuedDropping(dropped + 1),
                        }
                    }
                }
            }
        }
        let was_empty = !st.pending();
        st.data_bytes += frame.len();
        st.data.push_back((topic, frame));
        drop(st);
        if was_empty {
            self.writer_wake.notify_one();
        }
        if dropped > 0 {
            Push::QueuedDropping(dropped)
        } else {
            Push::Queued
        }
    }

    /// Queues a control frame (a pong, a ping) ahead of any queued data. Past
    /// [`MAX_PENDING_CONTROL`] pending frames of its kind, the oldest is dropped: RFC 6455 §5.5.3
    /// lets a pong answer only the most recent ping, and a client that pings without reading must
    /// not grow the queue. (Autobahn 2.10/2.11 expect every one of 10 pings answered.)
    pub(crate) fn push_control(&self, frame: Bytes) {
        let mut st = self.lock();
        if st.close.is_some() {
            return;
        }
        let same_kind = st
            .control
            .iter()
            .filter(|f| f.first() == frame.first())
            .count();
        if same_kind >= MAX_PENDING_CONTROL {
            if let Some(oldest) = st.control.iter().position(|f| f.first() == frame.first()) {
                st.control.remove(oldest);
            }
        }
        st.control.push(frame);
        drop(st);
        self.writer_wake.notify_one();
    }

    /// Starts the closing handshake. With `flush`, queued data is written first (shutdown, an
    /// answer to the client's close); without, it is dropped (protocol error, slow consumer).
    /// Only the first close counts.
    pub(crate) fn close(&self, code: u16, reason: &str, flush: bool) {
        let mut st = self.lock();
        if st.close.is_some() {
            return;
        }
        if !flush {
            st.data.clear();
            st.data_bytes = 0;
        }
        st.close = Some(frame::encode_close(code, reason));
        drop(st);
        self.wake_all();
    }

    /// Whether a close has been queued or the socket has failed.
    pub(crate) fn is_ending(&self) -> bool {
        // Acquire pairs with the Release in `wake_all`: whoever sees the flag also sees the
        // close that was queued before it.
        self.ending.load(Ordering::Acquire)
    }

    /// Resolves once the connection must end.
    pub(crate) async fn ended(&self) {
        loop {
            let notified = self.reader_wake.notified();
            if self.is_ending() {
                return;
            }
            notified.await;
        }
    }

    fn wake_all(&self) {
        self.ending.store(true, Ordering::Release);
        self.writer_wake.notify_one();
        self.reader_wake.notify_one();
    }

    /// Takes everything queued into `batch` (control frames first). Returns whether the batch
    /// ends with the close frame.
    pub(crate) fn take(&self, batch: &mut Vec<Bytes>) -> bool {
        let mut st = self.lock();
        st.writing = true;
        batch.extend(st.partial.take());
        batch.append(&mut st.control);
        batch.extend(st.data.drain(..).map(|(_, frame)| frame));
        st.data_bytes = 0;
        match &st.close {
            Some(close) => {
                batch.push(close.clone());
                true
            }
            None => false,
        }
    }

    /// Lets the shard write to `socket` directly (see [`push_or_write`](Self::push_or_write)).
    pub(crate) fn attach_socket(&self, socket: Arc<TcpStream>, write_delay: Duration) {
        let mut st = self.lock();
        if st.close.is_none() {
            st.direct = Some(Direct {
                socket,
                write_delay,
            });
        }
    }

    /// Stops direct writes and lets go of the socket, so that it closes with the connection's
    /// tasks even while a [`WsSink`](crate::sink::WsSink) still holds the `Conn`.
    pub(crate) fn detach_socket(&self) {
        let direct = self.lock().direct.take();
        drop(direct);
    }

    /// The writer finished writing `frames` frames; direct writes may resume. A wake-up that
    /// found nothing to write is not a write: it leaves the batching state as it was.
    fn written(&self, frames: usize) {
        let mut st = self.lock();
        st.writing = false;
        if frames > 0 {
            st.last_write = Some((Instant::now(), frames));
        }
    }

    /// Whether a writer woken now waits `write_delay` first ([`State::batching`]).
    fn batching(&self, write_delay: Duration) -> bool {
        self.lock().batching(Instant::now(), write_delay)
    }

    /// Marks the socket as failed: further frames are dropped and the reader is woken.
    pub(crate) fn fail(&self) {
        let mut st = self.lock();
        st.data.clear();
        st.data_bytes = 0;
        st.control.clear();
        st.partial = None;
        let direct = st.direct.take();
        if st.close.is_none() {
            st.close = Some(Bytes::new());
        }
        drop(st);
        drop(direct);
        self.wake_all();
    }
}

/// Keeps, of each topic's queued frames, only the newest — and none of `incoming`'s topic, whose
/// newer frame is about to be queued. Direct frames stay. Returns how many frames were dropped.
fn conflate(st: &mut State, incoming: TopicKey) -> u64 {
    let mut seen = ahash::AHashSet::new();
    if incoming != NO_TOPIC {
        seen.insert(incoming);
    }
    let before = st.data.len();
    let mut kept = VecDeque::with_capacity(before);
    for (topic, frame) in st.data.drain(..).rev() {
        if topic == NO_TOPIC || seen.insert(topic) {
            kept.push_front((topic, frame));
        } else {
            st.data_bytes -= frame.len();
        }
    }
    st.data = kept;
    (before - st.data.len()) as u64
}

/// A writer that wrote within this long counts as under load and waits `write_delay` before its
/// next write (see `run_writer`): it receives frames faster than one per 4 ms (250 per second).
const LOADED_WINDOW: Duration = Duration::from_millis(4);

/// A writer whose last write carried at least this many frames stays under load for as long
/// as it is woken within `write_delay` of that write (see [`loaded`]).
const LOADED_BATCH: usize = 3;

/// Whether a writer waking now waits `write_delay` first: it wrote within [`LOADED_WINDOW`], or
/// its last write carried [`LOADED_BATCH`] frames or more and was less than `write_delay` ago.
/// The second keeps a connection that batches batching: frames that arrive every few
/// milliseconds land in the 4 ms window only some of the time, and each miss was a write of one
/// frame. Three, not two: a connection receiving 80 frames a second evenly gathers two in a
/// 20 ms wait now and then, and would then keep paying the delay for writes of one or two.
fn loaded(since_last_write: Duration, last_batch: usize, write_delay: Duration) -> bool {
    since_last_write < LOADED_WINDOW
        || (last_batch >= LOADED_BATCH && since_last_write < write_delay)
}

/// Drains `conn`'s queue into `io` until the close frame is written or the socket fails.
pub(crate) async fn run_writer<W>(
    conn: Arc<Conn>,
    mut io: W,
    write_delay: Duration,
    write_timeout: Duration,
    metrics: Arc<Metrics>,
) where
    W: AsyncWrite + Unpin,
{
    let mut batch: Vec<Bytes> = Vec::new();
    // The delay is adaptive (see `loaded`): a connection that receives frames fast enough to
    // batch them waits `write_delay` so they share one write; one that has been quiet writes at
    // once, so the delay costs nothing at low rates (a chat message, a dashboard tick). The 4 ms
    // window does not scale with the delay: a connection receiving a frame every 12 ms gains
    // nothing from a 20 ms wait (each write would carry one or two frames) and would only pay
    // its latency.
    loop {
        conn.writer_wake.notified().await;
        let delay = !write_delay.is_zero() && !conn.is_ending() && conn.batching(write_delay);
        // Boxed: the delay and the write (timers, `writev` state) are this task's largest
        // states, and a future is as large as its largest state. Boxing them costs one
        // allocation per batch written, and keeps an idle connection's writer task small.
        let written = Box::pin(async {
            if delay {
                tokio::time::sleep(write_delay).await;
            }
            let closing = conn.take(&mut batch);
            write_frames(&mut io, &batch, write_timeout)
                .await
                .map(|()| closing)
        })
        .await;
        let closing = match written {
            Ok(closing) => closing,
            Err(e) => {
                tracing::debug!(conn_id = %conn.id, error = %e, "write failed");
                conn.fail();
                return;
            }
        };
        conn.written(batch.len());
        metrics.add_bytes_written(batch.iter().map(|f| f.len() as u64).sum());
        batch.clear();
        if closing {
            conn.detach_socket();
            let _ = io.shutdown().await;
            return;
        }
        if batch.capacity() > 1024 {
            // A burst is over: give the memory back rather than keep it per idle connection.
            batch = Vec::new();
        }
    }
}

/// The write side of a TCP connection whose socket the shard may also write to directly
/// ([`Conn::push_or_write`]): both hold the stream, and the [`Conn`]'s lock keeps their writes
/// apart.
#[derive(Debug)]
pub(crate) struct TcpWriter(pub(crate) Arc<TcpStream>);

impl TcpWriter {
    fn poll_io<T>(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&TcpStream) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            // A `WouldBlock` clears the readiness, so the next `poll_write_ready` waits for room.
            match write(&self.0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                res => return Poll::Ready(res),
            }
        }
    }
}

impl AsyncWrite for TcpWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(cx, |s| s.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_io(cx, |s| s.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Half-closes the stream, as dropping tokio's `OwnedWriteHalf` does.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// Most slices handed to one `writev`. The array lives on the stack only inside `poll`, so it
/// does not enlarge the writer task.
const MAX_IOV: usize = 128;

/// Writes `frames` in order with as few syscalls as the socket allows. A write that makes no
/// progress for `timeout` fails with `TimedOut`.
pub(crate) async fn write_frames<W>(
    io: &mut W,
    frames: &[Bytes],
    timeout: Duration,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let timed_out = || io::Error::from(io::ErrorKind::TimedOut);
    let (mut idx, mut offset) = (0usize, 0usize);
    while idx < frames.len() {
        if idx + 1 == frames.len() {
            let last = &frames[idx][offset..];
            return tokio::time::timeout(timeout, io.write_all(last))
                .await
                .map_err(|_| timed_out())?;
        }
        let write = poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for (k, f) in frames[idx..].iter().take(MAX_IOV).enumerate() {
                slices[k] = IoSlice::new(if k == 0 { &f[offset..] } else { &f[..] });
                n += 1;
            }
            Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])
        });
        let written = tokio::time::timeout(timeout, write)
            .await
            .map_err(|_| timed_out())??;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = written;
        while left > 0 {
            let rest = frames[idx].len() - offset;
            if left >= rest {
                left -= rest;
                idx += 1;
                offset = 0;
            } else {
                offset += left;
                left = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_waits_while_it_batches_and_not_after() {
        let ms = Duration::from_millis;
        let delay = ms(20);
        assert!(loaded(ms(3), 1, delay), "wrote within 4 ms");
        assert!(!loaded(ms(5), 1, delay), "one frame, then quiet for 5 ms");
        assert!(
            !loaded(ms(5), 2, delay),
            "two frames are not yet a batch worth waiting for"
        );
        assert!(
            loaded(ms(15), 3, delay),
            "three frames and woken within the delay"
        );
        assert!(!loaded(ms(25), 8, delay), "a batch long ago");
    }

    #[test]
    fn queue_is_bounded_in_bytes() {
        let conn = Conn::new(Uuid::nil(), 0, 10, SlowConsumerPolicy::Close);
        assert_eq!(
            conn.push(Bytes::from_static(b"12345"), NO_TOPIC),
            Push::Queued
        );
        assert_eq!(
            conn.push(Bytes::from_static(b"12345"), NO_TOPIC),
            Push::Queued
        );
        assert_eq!(
            conn.push(Bytes::from_static(b"1"), NO_TOPIC),
            Push::Overflow
        );
        assert!(conn.is_ending());
        assert_eq!(conn.push(Bytes::from_static(b"1"), NO_TOPIC), Push::Closed);
        let mut batch = Vec::new();
        assert!(conn.take(&mut batch));
        // Only the 1008 close frame is left.
        assert_eq!(batch.len(), 1);
        assert_eq!(&batch[0][2..4], &1008u16.to_be_bytes());
    }

    #[test]
    fn close_with_flush_keeps_queued_data_first() {
        let conn = Conn::new(Uuid::nil(), 0, 100, SlowConsumerPolicy::Close);
        conn.push(Bytes::from_static(b"a"), NO_TOPIC);
        conn.push_control(Bytes::from_static(b"p"));
        conn.close(1001, "bye", true);
        let mut batch = Vec::new();
        assert!(conn.take(&mut batch));
        assert_eq!(&batch[0][..], b"p");
        assert_eq!(&batch[1][..], b"a");
        assert_eq!(&batch[2][2..4], &1001u16.to_be_bytes());
    }

    #[test]
    fn control_frames_keep_only_the_newest_few_of_each_kind() {
        let conn = Conn::new(Uuid::nil(), 0, 100, SlowConsumerPolicy::Close);
        for i in 0..1000u16 {
            conn.push_control(frame::encode(frame::OpCode::Pong, &i.to_be_bytes()));
        }
        conn.push_control(frame::encode(frame::OpCode::Ping, b""));
        let mut batch = Vec::new();
        conn.take(&mut batch);
        assert_eq!(batch.len(), MAX_PENDING_CONTROL + 1);
        assert_eq!(
            &batch[0][2..],
            &(1000 - MAX_PENDING_CONTROL as u16).to_be_bytes()
        );
        assert_eq!(&batch[MAX_PENDING_CONTROL - 1][2..], &999u16.to_be_bytes());
    }

    #[test]
    fn drop_oldest_keeps_the_newest_and_the_connection() {
        let conn = Conn::new(Uuid::nil(), 0, 10, SlowConsumerPolicy::DropOldest);
        for f in [&b"aaaa"[..], b"bbbb", b"cccc"] {
            conn.push(Bytes::from_static(f), NO_TOPIC);
        }
        assert!(!conn.is_ending());
        let mut batch = Vec::new();
        assert!(!conn.take(&mut batch));
        assert_eq!(batch, vec![&b"bbbb"[..], b"cccc"]);
        // A frame larger than the whole bound is the one dropped.
        assert_eq!(
            conn.push(Bytes::from(vec![0; 11]), NO_TOPIC),
            Push::QueuedDropping(1)
        );
    }

    #[test]
    fn latest_per_topic_conflates_when_full() {
        let conn = Conn::new(Uuid::nil(), 0, 12, SlowConsumerPolicy::LatestPerTopic);
        // Under the bound nothing is replaced.
        assert_eq!(conn.push(Bytes::from_static(b"a1"), 1), Push::Queued);
        assert_eq!(conn.push(Bytes::from_static(b"b1"), 2), Push::Queued);
        assert_eq!(conn.push(Bytes::from_static(b"a2"), 1), Push::Queued);
        assert_eq!(conn.push(Bytes::from_static(b"d1"), NO_TOPIC), Push::Queued);
        assert_eq!(conn.push(Bytes::from_static(b"b2"), 2), Push::Queued);
        assert_eq!(conn.push(Bytes::from_static(b"a3"), 1), Push::Queued);
        // Full: compacted to the newest of each topic, the incoming one replacing a3.
        assert_eq!(
            conn.push(Bytes::from_static(b"a4"), 1),
            Push::QueuedDropping(4)
        );
        let mut batch = Vec::new();
        conn.take(&mut batch);
        assert_eq!(batch, vec![&b"d1"[..], b"b2", b"a4"]);
    }

    /// A connected loopback pair: the server's end (shared, as the writer and the shard hold
    /// it) and the client's.
    async fn tcp_pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (Arc::new(accepted.unwrap().0), client.unwrap())
    }

    async fn read_exactly(client: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::io::AsyncReadExt::read_exact(client, &mut buf)
            .await
            .unwrap();
        buf
    }

    #[tokio::test]
    async fn a_frame_is_written_directly_only_while_nothing_else_is_pending() {
        let (socket, mut client) = tcp_pair().await;
        let conn = Conn::new(Uuid::nil(), 0, 1 << 30, SlowConsumerPolicy::Close);
        let delay = Duration::from_millis(20);
        conn.attach_socket(socket.clone(), delay);
        // Wait until tokio has seen the new socket writable: until then a write is refused.
        std::future::poll_fn(|cx| socket.poll_write_ready(cx))
            .await
            .unwrap();
        let t0 = Instant::now();

        let a = Bytes::from_static(b"first");
        assert_eq!(
            conn.push_or_write(a.clone(), NO_TOPIC, t0),
            Push::Written(5)
        );
        assert_eq!(read_exactly(&mut client, 5).await, b"first");

        // Written 0 ms ago: the connection counts as batching, so the next frame is queued.
        let b = Bytes::from_static(b"second");
        assert_eq!(conn.push_or_write(b.clone(), NO_TOPIC, t0), Push::Queued);
        // Queued data goes first, whatever the time: a direct write would overtake it.
        let later = t0 + Duration::from_secs(1);
        let c = Bytes::from_static(b"third");
        assert_eq!(conn.push_or_write(c.clone(), NO_TOPIC, later), Push::Queued);
        let mut batch = Vec::new();
        conn.take(&mut batch);
        assert_eq!(batch, vec![b.clone(), c.clone()]);
        // The writer has taken frames and not finished: still no direct write.
        let d = Bytes::from_static(b"fourth");
        assert_eq!(conn.push_or_write(d, NO_TOPIC, later), Push::Queued);
        conn.take(&mut batch);
        conn.written(batch.len());

        // Idle again, and long enough after its last write.
        let much_later = Instant::now() + Duration::from_secs(1);
        let e = Bytes::from_static(b"fifth");
        assert_eq!(
            conn.push_or_write(e, NO_TOPIC, much_later),
            Push::Written(5)
        );
        assert_eq!(read_exactly(&mut client, 5).await, b"fifth");

        // A closing connection takes nothing more, directly or not.
        conn.close(1000, "", true);
        let f = Bytes::from_static(b"sixth");
        assert_eq!(conn.push_or_write(f, NO_TOPIC, much_later), Push::Closed);
    }

    #[tokio::test]
    async fn the_rest_of_a_partly_written_frame_goes_first_and_is_never_dropped() {
        let (socket, mut client) = tcp_pair().await;
        // A bound smaller than the frame: the rest must be kept anyway.
        let conn = Conn::new(Uuid::nil(), 0, 16, SlowConsumerPolicy::DropOldest);
        conn.attach_socket(socket.clone(), Duration::from_millis(20));
        std::future::poll_fn(|cx| socket.poll_write_ready(cx))
            .await
            .unwrap();
        // Larger than any loopback socket buffer: the socket takes only part of it.
        let big: Bytes = (0..64u32 << 20)
            .map(|i| i as u8)
            .collect::<Vec<u8>>()
            .into();
        let Push::Written(n) = conn.push_or_write(big.clone(), NO_TOPIC, Instant::now()) else {
            panic!("the first frame is written directly");
        };
        assert!(n > 0 && n < big.len(), "wrote {n} of {}", big.len());
        // The writer sends the rest at once: the delay would only hold up this frame.
        assert!(!conn.batching(Duration::from_millis(20)));
        // Later frames queue behind the rest; the policy drops those, never the rest.
        for _ in 0..4 {
            conn.push(Bytes::from_static(b"0123456789"), NO_TOPIC);
        }
        let mut batch = Vec::new();
        conn.take(&mut batch);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0], big.slice(n..));
        assert_eq!(&batch[1][..], b"0123456789");

        // The writer finishes the frame: the client gets it whole, then the queued frame.
        let mut writer = TcpWriter(socket);
        let reading = tokio::spawn(async move {
            let got = read_exactly(&mut client, big.len() + 10).await;
            got[..big.len()] == big[..] && &got[big.len()..] == b"0123456789"
        });
        write_frames(&mut writer, &batch, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(reading.await.unwrap());
    }

    #[tokio::test]
    async fn write_frames_survives_partial_writes() {
        // A duplex pipe with a tiny buffer forces many partial writes.
        let (mut a, mut b) = tokio::io::duplex(7);
        let frames: Vec<Bytes> = (0..50u8)
            .map(|i| Bytes::from(vec![i; (i as usize % 13) + 1]))
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut out)
                .await
                .unwrap();
            out
        });
        write_frames(&mut a, &frames, Duration::from_secs(10))
            .await
            .unwrap();
        drop(a);
        assert_eq!(reader.await.unwrap(), expected);
    }
}
