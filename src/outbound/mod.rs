//! The outbound side of a connection: its queue, who writes to its socket, and when.
//!
//! - [`queue`]: the byte-bounded queue of pre-encoded frames and the slow-consumer policies.
//! - [`gate`]: the one place that decides "write this frame now, or let it wait for a batch".
//! - [`writer`]: the writer task and its vectored writes.
//! - here: [`Conn`], the state a connection's tasks and its shard share, and the holder model of
//!   the socket's write side.
//!
//! # Guards
//! `Conn::state` is a `std::sync::Mutex`: it is held to push a frame, to take the queue, or for
//! one non-blocking `write`, never across an `.await`. It is contended by at most one shard and
//! the connection's own tasks — never by two shards, because a connection belongs to exactly one
//! shard (invariant 3, docs/architecture.md).
//!
//! # Who writes to the socket
//! A TCP connection's stream is one `Arc<TcpStream>` with three holders:
//! - the **reader** (the connection task) only reads;
//! - the **writer** task writes whatever it took from the queue;
//! - the **`Conn`** holds it (`State::socket`) so that the shard can write a delivered frame
//!   itself ([`Conn::push_or_write`]).
//!
//! Writes never overlap, because both writers decide under the `Conn`'s lock: the shard writes
//! only while holding it, and only when [`Pace::may_write_directly`](gate::Pace) says the writer
//! holds nothing unwritten and nothing else is pending. Whatever a direct write leaves unwritten
//! becomes the queue's `partial` frame, which the writer sends before anything else.
//!
//! The socket is attached in one place, when the writer starts ([`writer::spawn`]), and
//! detached in one place, [`Conn::detach_socket`]: by the writer whenever it ends (its close
//! written, a failed write, or the task aborted) and by [`Conn::fail`]. After that only the
//! reader and the writer's own handle keep the stream, so it closes with the connection's tasks
//! even while the application still holds a [`WsSink`](crate::sink::WsSink) to the `Conn`.
//!
//! Bytes written to sockets are counted where they are written, into a [`WriteTally`], and
//! reported to the metrics once per delivery or per batch, not once per frame.

mod gate;
mod queue;
mod writer;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::deflate::Agreed;
use crate::frame;
use crate::metrics::Metrics;
use crate::wire::Format;
use gate::Pace;
use queue::{Limits, Queue, Queued};

pub(crate) use gate::{Delivered, DirectGate};
pub use queue::SlowConsumerPolicy;
pub(crate) use queue::{DEFAULT_CEILING_FACTOR, DEFAULT_GRACE, NO_TOPIC, POSITIONED, TopicKey};
pub(crate) use writer::{WriteSide, spawn as spawn_writer};

/// What happened to a frame handed to [`Conn::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    /// Queued for the writer.
    Queued,
    /// Queued, after dropping this many older frames (policies `DropOldest`, `LatestPerTopic`).
    QueuedDropping(u64),
    /// Written straight to the socket, in full or in part (any rest is queued first).
    Written,
    /// The connection is closing or gone; the frame was dropped.
    Closed,
    /// The frame would pass the queue's byte bound: the queue was cleared and the connection is
    /// being closed with 1008 (slow-consumer policy `Close`).
    Overflow,
}

/// What the shard hears of a data frame the queue took as `queued`.
fn pushed(queued: Queued) -> Push {
    match queued {
        Queued::Yes { dropped: 0 } => Push::Queued,
        Queued::Yes { dropped } => Push::QueuedDropping(dropped),
        // The frame alone is larger than the bound: it is the one dropped.
        Queued::DroppedItself { dropped } => Push::QueuedDropping(dropped + 1),
        Queued::Overflow => Push::Overflow,
        Queued::Closed => Push::Closed,
    }
}

/// What a writer whose write makes no progress does next ([`Conn::writer_stalled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stalled {
    /// Keep waiting for the socket.
    Wait,
    /// Stop at the next frame boundary: a close without flush is queued.
    Cut,
    /// The same, and the connection was just closed as a slow consumer (count it).
    CutLagged,
}

/// Bytes written to client sockets, summed where they are written and reported in one update.
#[derive(Debug, Default)]
pub(crate) struct WriteTally(u64);

impl WriteTally {
    fn add(&mut self, bytes: usize) {
        self.0 += bytes as u64;
    }

    /// Bytes counted so far.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.0
    }

    /// Adds what was counted to `metrics`' `bytes_written`.
    pub(crate) fn report(self, metrics: &Metrics) {
        if self.0 > 0 {
            metrics.add_bytes_written(self.0);
        }
    }
}

/// Everything behind a connection's lock.
#[derive(Debug, Default)]
struct State {
    queue: Queue,
    pace: Pace,
    /// The socket, for the shard's direct writes (TCP only, between attach and detach).
    socket: Option<DirectSocket>,
}

/// What a direct write needs: the socket, and the connection's write delay for the [`gate`]
/// (in microseconds, saturated: a `Duration` would take twice the room in every connection).
#[derive(Debug)]
struct DirectSocket {
    stream: Arc<TcpStream>,
    write_delay_us: u32,
}

impl DirectSocket {
    fn write_delay(&self) -> Duration {
        from_micros(self.write_delay_us)
    }
}

/// `d` in whole microseconds, saturated at `u32::MAX` (71 minutes): how a connection's
/// durations are kept where every idle connection holds them.
fn micros(d: Duration) -> u32 {
    d.as_micros().try_into().unwrap_or(u32::MAX)
}

/// The [`Duration`] of `us` microseconds ([`micros`]'s inverse).
fn from_micros(us: u32) -> Duration {
    Duration::from_micros(us.into())
}

/// The shared part of one connection: its outbound queue and the signals between its tasks.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) id: Uuid,
    /// Index of the shard that owns this connection.
    pub(crate) shard: usize,
    /// The format its frames are sent in, for its whole life.
    pub(crate) format: Format,
    limits: Limits,
    policy: SlowConsumerPolicy,
    state: Mutex<State>,
    /// Wakes the writer. `notify_one` keeps a permit, so a push between the writer's drain and
    /// its next wait is never missed.
    writer_wake: Notify,
    /// Set once the connection must end (close queued, or the socket failed); wakes the reader.
    ending: AtomicBool,
    reader_wake: Notify,
    /// permessage-deflate as agreed on the upgrade; `None`: plain frames only.
    deflate: Option<Agreed>,
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
            format: Format::Verbatim,
            limits: Limits {
                bound: max_queue_bytes,
                ceiling: max_queue_bytes.saturating_mul(DEFAULT_CEILING_FACTOR),
                grace: DEFAULT_GRACE,
            },
            policy,
            state: Mutex::new(State::default()),
            writer_wake: Notify::new(),
            ending: AtomicBool::new(false),
            reader_wake: Notify::new(),
            deflate: None,
        }
    }

    /// Sets what was agreed about permessage-deflate on the upgrade.
    pub(crate) fn with_deflate(mut self, deflate: Option<Agreed>) -> Self {
        self.deflate = deflate;
        self
    }

    /// permessage-deflate as agreed on the upgrade; `None`: plain frames only.
    pub(crate) fn deflate(&self) -> Option<Agreed> {
        self.deflate
    }

    /// Sets how far over its bound (`ceiling`, default 4× the bound) and for how long (`grace`)
    /// a connection under [`SlowConsumerPolicy::Close`] may hold data before it is closed.
    pub(crate) fn with_lag_limits(mut self, ceiling: Option<usize>, grace: Duration) -> Self {
        if let Some(ceiling) = ceiling {
            self.limits.ceiling = ceiling.max(self.limits.bound);
        }
        self.limits.grace = grace;
        self
    }

    /// Sets the format the connection's frames are sent in.
    pub(crate) fn with_format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// The positioned topics (keys with [`POSITIONED`]) of which the slow-consumer policy
    /// dropped a frame since the last call.
    pub(crate) fn take_lost(&self) -> Vec<TopicKey> {
        self.lock().queue.take_lost()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the guard is held cannot leave `State` inconsistent (every update is a
        // single push or swap), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a data frame of `topic` (or [`NO_TOPIC`]). Never blocks and never awaits: safe on
    /// the dispatch path. Past the byte bound, the slow-consumer policy decides.
    pub(crate) fn push(&self, frame: Bytes, topic: TopicKey) -> Push {
        self.push_locked(self.lock(), frame, topic, None)
    }

    /// [`push`](Self::push) for several data frames, in order, under one lock: what a shard
    /// pays per connection (the lock, the connection's state brought into the cache, the
    /// writer's wake-up) is paid once for all of them. `each` hears how every frame went, with
    /// its length.
    pub(crate) fn push_all(
        &self,
        frames: impl IntoIterator<Item = (Bytes, TopicKey)>,
        mut each: impl FnMut(Push, usize),
    ) {
        let mut st = self.lock();
        let was_empty = !st.queue.pending();
        let (mut queued, mut overflowed) = (false, false);
        for (frame, topic) in frames {
            let len = frame.len();
            let result = st
                .queue
                .push(frame, topic, self.limits, self.policy, Instant::now);
            queued |= matches!(result, Queued::Yes { .. });
            overflowed |= result == Queued::Overflow;
            each(pushed(result), len);
        }
        drop(st);
        if overflowed {
            self.wake_all();
        } else if was_empty && queued {
            self.writer_wake.notify_one();
        }
    }

    /// Like [`push`](Self::push), but writes the frame to the socket at once when the [`gate`]
    /// allows it for this connection at `now` (nothing pending, writer idle, not batching),
    /// counting what it wrote into `tally`. Never blocks: a socket that does not take the whole
    /// frame gets the rest queued for the writer. A frame larger than the byte bound is refused
    /// by the policy here too, never written.
    pub(crate) fn push_or_write(
        &self,
        frame: Bytes,
        topic: TopicKey,
        now: Instant,
        tally: &mut WriteTally,
    ) -> Push {
        let mut st = self.lock();
        let st_ref = &mut *st;
        // A frame larger than the whole bound is never written directly: it meets the policy
        // in `push_locked`, as it would if the connection were busy.
        let direct = st_ref.socket.as_ref().filter(|s| {
            frame.len() <= self.limits.bound
                && st_ref.queue.close.is_none()
                && st_ref
                    .pace
                    .may_write_directly(st_ref.queue.pending(), now, s.write_delay())
        });
        if let Some(socket) = direct {
            match socket.stream.try_write(&frame) {
                Ok(n) => {
                    tally.add(n);
                    st.pace.wrote_directly(now);
                    if n < frame.len() {
                        st.queue.partial = Some(frame.slice(n..));
                        drop(st);
                        self.writer_wake.notify_one();
                    }
                    return Push::Written;
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
        self.push_locked(st, frame, topic, Some(now))
    }

    fn push_locked(
        &self,
        mut st: MutexGuard<'_, State>,
        frame: Bytes,
        topic: TopicKey,
        now: Option<Instant>,
    ) -> Push {
        let was_empty = !st.queue.pending();
        let now = || now.unwrap_or_else(Instant::now);
        let result = st.queue.push(frame, topic, self.limits, self.policy, now);
        drop(st);
        match result {
            Queued::Yes { .. } if was_empty => self.writer_wake.notify_one(),
            Queued::Overflow => self.wake_all(),
            _ => {}
        }
        pushed(result)
    }

    /// Queues a control frame (a pong, a ping) ahead of any queued data. Past
    /// [`MAX_PENDING_CONTROL`](queue::MAX_PENDING_CONTROL) pending frames of its kind, the
    /// oldest is dropped: RFC 6455 §5.5.3 lets a pong answer only the most recent ping, and a
    /// client that pings without reading must not grow the queue. (Autobahn 2.10/2.11 expect
    /// every one of 10 pings answered.)
    pub(crate) fn push_control(&self, frame: Bytes) {
        let queued = self.lock().queue.push_control(frame);
        if queued {
            self.writer_wake.notify_one();
        }
    }

    /// Starts the closing handshake. With `flush`, queued data is written first (shutdown, an
    /// answer to the client's close); without, it is dropped (protocol error, slow consumer).
    /// Only the first close counts.
    pub(crate) fn close(&self, code: u16, reason: &str, flush: bool) {
        let mut st = self.lock();
        if st.queue.close.is_some() {
            return;
        }
        if !flush {
            st.queue.clear_data();
            st.queue.discard = true;
        }
        st.queue.close = Some(frame::encode_close(code, reason));
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

    /// Takes everything queued into `batch` (a partial frame's rest, control frames, data, then
    /// the close frame) for the writer, which holds it until [`written`](Self::written). Returns
    /// whether the batch ends with the close frame.
    pub(crate) fn take(&self, batch: &mut Vec<Bytes>) -> bool {
        let mut st = self.lock();
        st.pace.writer_took();
        st.queue.take_into(batch)
    }

    /// Lets the shard write to `stream` directly (see [`push_or_write`](Self::push_or_write)).
    fn attach_socket(&self, stream: Arc<TcpStream>, write_delay: Duration) {
        let mut st = self.lock();
        if st.queue.close.is_none() {
            st.socket = Some(DirectSocket {
                stream,
                write_delay_us: micros(write_delay),
            });
        }
    }

    /// Stops direct writes and lets go of the socket (see the module docs).
    fn detach_socket(&self) {
        let socket = self.lock().socket.take();
        // Dropped outside the lock: the last holder's drop closes the socket.
        drop(socket);
    }

    /// The writer finished writing `frames` frames; direct writes may resume.
    fn written(&self, frames: usize) {
        let mut st = self.lock();
        st.queue.batch_written(self.limits.bound);
        st.pace.writer_wrote(frames, Instant::now());
    }

    /// The writer's batch has `unwritten` bytes left after a write the socket took only part
    /// of: the data it holds is at most that much now, so what the client has read no longer
    /// counts against its bound.
    fn batch_progress(&self, unwritten: usize) {
        self.lock()
            .queue
            .batch_progress(unwritten, self.limits.bound);
    }

    /// How often a writer whose write makes no progress asks
    /// [`writer_stalled`](Self::writer_stalled): every grace under policy `Close`, so a connection that stays
    /// over its bound with nothing more pushed is still closed; otherwise only at the timeout.
    fn stall_check_every(&self, write_timeout: Duration) -> Duration {
        match self.policy {
            SlowConsumerPolicy::Close if !self.limits.grace.is_zero() => {
                self.limits.grace.min(write_timeout)
            }
            _ => write_timeout,
        }
    }

    /// Asked by a writer whose write has made no progress for a while: may it stop writing its
    /// batch at the next frame boundary? Yes once a close without flush is queued, and (policy
    /// `Close`) once the connection has stayed over its bound for the whole grace, which queues
    /// the 1008 close now.
    fn writer_stalled(&self) -> Stalled {
        let mut st = self.lock();
        if st.queue.discard {
            return Stalled::Cut;
        }
        if self.policy == SlowConsumerPolicy::Close
            && st.queue.close.is_none()
            && st.queue.lagged(self.limits, Instant::now())
        {
            st.queue.close_slow_consumer();
            drop(st);
            self.wake_all();
            return Stalled::CutLagged;
        }
        Stalled::Wait
    }

    /// The writer stopped its batch after `frames` whole frames (see
    /// [`writer_stalled`](Self::writer_stalled)); `rest` is what is left of the frame it was in, which goes first.
    fn cut(&self, frames: usize, rest: Option<Bytes>) {
        let mut st = self.lock();
        st.queue.batch_written(self.limits.bound);
        st.queue.partial = rest;
        st.pace.writer_wrote(frames, Instant::now());
    }

    /// Most data bytes this connection held while over its bound (0 if it never went over).
    fn peak(&self) -> usize {
        self.lock().queue.peak
    }

    /// Whether a writer woken now waits `write_delay` before taking the queue.
    fn writer_waits_first(&self, write_delay: Duration) -> bool {
        let st = self.lock();
        st.pace
            .waits_first(st.queue.partial.is_some(), Instant::now(), write_delay)
    }

    /// Marks the socket as failed: further frames are dropped, the socket is detached and the
    /// reader is woken.
    pub(crate) fn fail(&self) {
        let mut st = self.lock();
        st.queue.clear_all();
        let socket = st.socket.take();
        if st.queue.close.is_none() {
            st.queue.close = Some(Bytes::new());
        }
        drop(st);
        drop(socket);
        self.wake_all();
    }
}

#[cfg(test)]
mod tests {
    use super::queue::MAX_PENDING_CONTROL;
    use super::writer::{TcpWriter, WriteTiming, Wrote, write_frames};
    use super::*;

    const TEN_S: Duration = Duration::from_secs(10);
    const TIMING: WriteTiming = WriteTiming {
        timeout: TEN_S,
        check_every: TEN_S,
    };

    /// Dropping a positioned frame records its topic once; dropping any other records nothing.
    #[test]
    fn dropped_positioned_frames_are_recorded_by_topic() {
        for policy in [
            SlowConsumerPolicy::DropOldest,
            SlowConsumerPolicy::LatestPerTopic,
        ] {
            let conn = Conn::new(Uuid::nil(), 0, 10, policy);
            let (plain, positioned) = (16 as TopicKey, 32 | POSITIONED);
            conn.push(Bytes::from_static(b"aaaa"), plain);
            conn.push(Bytes::from_static(b"bbbb"), plain);
            assert!(matches!(
                conn.push(Bytes::from_static(b"cccc"), plain),
                Push::QueuedDropping(_)
            ));
            assert!(conn.take_lost().is_empty(), "{policy:?}");
            for _ in 0..3 {
                conn.push(Bytes::from_static(b"dddd"), positioned);
            }
            assert_eq!(conn.take_lost(), vec![positioned], "{policy:?}");
            assert!(conn.take_lost().is_empty());
        }
    }

    #[test]
    fn queue_is_bounded_in_bytes() {
        // No grace: closed at the bound.
        let conn = Conn::new(Uuid::nil(), 0, 10, SlowConsumerPolicy::Close)
            .with_lag_limits(None, Duration::ZERO);
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
    fn the_bound_counts_what_the_writer_took_and_has_not_written() {
        let conn = Conn::new(Uuid::nil(), 0, 10, SlowConsumerPolicy::Close)
            .with_lag_limits(None, Duration::ZERO);
        assert_eq!(
            conn.push(Bytes::from_static(b"12345678"), NO_TOPIC),
            Push::Queued
        );
        let mut batch = Vec::new();
        conn.take(&mut batch);
        // The writer still holds those 8 bytes: 5 more would hold 13.
        assert_eq!(
            conn.push(Bytes::from_static(b"12345"), NO_TOPIC),
            Push::Overflow
        );

        let conn = Conn::new(Uuid::nil(), 0, 10, SlowConsumerPolicy::DropOldest);
        conn.push(Bytes::from_static(b"12345678"), NO_TOPIC);
        batch.clear();
        conn.take(&mut batch);
        assert_eq!(conn.push(Bytes::from_static(b"a"), NO_TOPIC), Push::Queued);
        assert_eq!(conn.push(Bytes::from_static(b"b"), NO_TOPIC), Push::Queued);
        // 8 taken + 2 queued fill the bound: the oldest queued one makes room.
        assert_eq!(
            conn.push(Bytes::from_static(b"c"), NO_TOPIC),
            Push::QueuedDropping(1)
        );
        // Once the batch is written, its bytes no longer count.
        conn.written(batch.len());
        assert_eq!(
            conn.push(Bytes::from_static(b"12345678"), NO_TOPIC),
            Push::Queued
        );
        batch.clear();
        conn.take(&mut batch);
        assert_eq!(batch, vec![&b"b"[..], b"c", b"12345678"]);
    }

    #[tokio::test]
    async fn the_bound_counts_the_rest_of_a_partly_written_frame() {
        let (socket, _client) = tcp_pair().await;
        let big: Bytes = vec![7u8; 64 << 20].into();
        let bound = big.len() + 16;
        let conn = Conn::new(Uuid::nil(), 0, bound, SlowConsumerPolicy::Close)
            .with_lag_limits(None, Duration::ZERO);
        conn.attach_socket(socket.clone(), Duration::from_millis(20));
        std::future::poll_fn(|cx| socket.poll_write_ready(cx))
            .await
            .unwrap();
        let (push, n) = offer(&conn, big.clone(), Instant::now());
        assert_eq!(push, Push::Written);
        let rest = big.len() - n as usize;
        assert!(rest > 16, "the socket took {n} of {} bytes", big.len());
        // The rest is held for the writer: a frame that would take the total past the bound
        // meets the policy.
        let more = Bytes::from(vec![0u8; bound - rest + 1]);
        assert_eq!(conn.push(more, NO_TOPIC), Push::Overflow);
    }

    #[test]
    fn close_waits_out_the_grace_over_the_bound_and_never_passes_the_ceiling() {
        let grace = Duration::from_secs(1);
        let conn = Conn::new(Uuid::nil(), 0, 10, SlowConsumerPolicy::Close)
            .with_lag_limits(Some(25), grace);
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut tally = WriteTally::default();
        let mut push =
            |n: usize, at| conn.push_or_write(Bytes::from(vec![0; n]), NO_TOPIC, at, &mut tally);
        assert_eq!(push(8, t0), Push::Queued);
        // Over the bound: the grace starts, the frame is queued.
        assert_eq!(push(8, t0), Push::Queued);
        assert_eq!(push(8, t0 + grace / 2), Push::Queued);
        // Drained under the bound (the writer wrote its batch): the grace is over with it.
        let mut batch = Vec::new();
        conn.take(&mut batch);
        conn.written(batch.len());
        assert_eq!(push(8, t0 + grace * 2), Push::Queued);
        assert_eq!(push(8, t0 + grace * 2), Push::Queued);
        // Still over a whole grace later: closed.
        assert_eq!(push(1, t0 + grace * 3), Push::Overflow);
        assert!(conn.is_ending());

        // Past the ceiling: closed at once, within the grace.
        let conn = Conn::new(Uuid::nil(), 0, 10, SlowConsumerPolicy::Close)
            .with_lag_limits(Some(25), grace);
        for _ in 0..3 {
            assert_eq!(conn.push(Bytes::from(vec![0; 8]), NO_TOPIC), Push::Queued);
        }
        assert_eq!(conn.lock().queue.held(), 24);
        assert_eq!(conn.push(Bytes::from(vec![0; 2]), NO_TOPIC), Push::Overflow);
        assert_eq!(conn.peak(), 24);

        // Over the bound and nothing more pushed: a stalled writer asking after the grace
        // closes it.
        let conn = Conn::new(Uuid::nil(), 0, 10, SlowConsumerPolicy::Close)
            .with_lag_limits(None, Duration::from_millis(1));
        conn.push(Bytes::from(vec![0; 8]), NO_TOPIC);
        conn.take(&mut batch);
        conn.push(Bytes::from(vec![0; 8]), NO_TOPIC);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(conn.writer_stalled(), Stalled::CutLagged);
        assert!(conn.is_ending());
        assert_eq!(conn.writer_stalled(), Stalled::Cut);
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

    /// `push_or_write` of a frame without a topic: what happened to it, and how many of its
    /// bytes went straight to the socket.
    fn offer(conn: &Conn, frame: Bytes, now: Instant) -> (Push, u64) {
        let mut tally = WriteTally::default();
        let push = conn.push_or_write(frame, NO_TOPIC, now, &mut tally);
        (push, tally.bytes())
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
        assert_eq!(offer(&conn, a.clone(), t0), (Push::Written, 5));
        assert_eq!(read_exactly(&mut client, 5).await, b"first");

        // Written 0 ms ago: the connection counts as batching, so the next frame is queued.
        let b = Bytes::from_static(b"second");
        assert_eq!(offer(&conn, b.clone(), t0), (Push::Queued, 0));
        // Queued data goes first, whatever the time: a direct write would overtake it.
        let later = t0 + Duration::from_secs(1);
        let c = Bytes::from_static(b"third");
        assert_eq!(offer(&conn, c.clone(), later), (Push::Queued, 0));
        let mut batch = Vec::new();
        conn.take(&mut batch);
        assert_eq!(batch, vec![b.clone(), c.clone()]);
        // The writer has taken frames and not finished: still no direct write.
        let d = Bytes::from_static(b"fourth");
        assert_eq!(offer(&conn, d, later), (Push::Queued, 0));
        conn.take(&mut batch);
        conn.written(batch.len());

        // Idle again, and long enough after its last write.
        let much_later = Instant::now() + Duration::from_secs(1);
        let e = Bytes::from_static(b"fifth");
        assert_eq!(offer(&conn, e, much_later), (Push::Written, 5));
        assert_eq!(read_exactly(&mut client, 5).await, b"fifth");

        // A closing connection takes nothing more, directly or not.
        conn.close(1000, "", true);
        let f = Bytes::from_static(b"sixth");
        assert_eq!(offer(&conn, f, much_later), (Push::Closed, 0));
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_bound_is_refused_written_directly_or_queued() {
        let (socket, mut client) = tcp_pair().await;
        std::future::poll_fn(|cx| socket.poll_write_ready(cx))
            .await
            .unwrap();
        let too_big = Bytes::from_static(b"12345678901");
        let idle = Instant::now() + Duration::from_secs(1);
        for direct in [true, false] {
            for policy in [SlowConsumerPolicy::Close, SlowConsumerPolicy::DropOldest] {
                let conn = Conn::new(Uuid::nil(), 0, 10, policy);
                if direct {
                    conn.attach_socket(socket.clone(), Duration::from_millis(20));
                }
                let push = offer(&conn, too_big.clone(), idle);
                let expected = match policy {
                    SlowConsumerPolicy::Close => (Push::Overflow, 0),
                    _ => (Push::QueuedDropping(1), 0),
                };
                assert_eq!(push, expected, "{policy:?}, direct: {direct}");
                assert_eq!(conn.is_ending(), policy == SlowConsumerPolicy::Close);
            }
        }
        // Nothing reached the socket.
        drop(socket);
        let mut rest = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut client, &mut rest)
            .await
            .unwrap();
        assert!(rest.is_empty(), "written: {rest:?}");
    }

    #[tokio::test]
    async fn the_rest_of_a_partly_written_frame_goes_first_and_is_never_dropped() {
        let (socket, mut client) = tcp_pair().await;
        // Larger than any loopback socket buffer: the socket takes only part of it.
        let big: Bytes = (0..64u32 << 20)
            .map(|i| i as u8)
            .collect::<Vec<u8>>()
            .into();
        // The bound just fits the frame: what follows its rest must make room for it.
        let conn = Conn::new(Uuid::nil(), 0, big.len(), SlowConsumerPolicy::DropOldest);
        conn.attach_socket(socket.clone(), Duration::from_millis(20));
        std::future::poll_fn(|cx| socket.poll_write_ready(cx))
            .await
            .unwrap();
        let (push, n) = offer(&conn, big.clone(), Instant::now());
        assert_eq!(push, Push::Written, "the first frame is written directly");
        let n = n as usize;
        assert!(n > 0 && n < big.len(), "wrote {n} of {}", big.len());
        // The writer sends the rest at once: the delay would only hold up this frame.
        assert!(!conn.writer_waits_first(Duration::from_millis(20)));
        // Later frames queue behind the rest; the policy drops those, never the rest. Frames of
        // `n` bytes: one fits beside the rest, the next pushes out the one before it.
        let later = |k: u8| Bytes::from(vec![k; n]);
        assert_eq!(conn.push(later(1), NO_TOPIC), Push::Queued);
        for k in 2..5 {
            assert_eq!(conn.push(later(k), NO_TOPIC), Push::QueuedDropping(1));
        }
        let mut batch = Vec::new();
        conn.take(&mut batch);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0], big.slice(n..));
        assert_eq!(batch[1], later(4));

        // The writer finishes the frame: the client gets it whole, then the queued frame.
        let mut writer = TcpWriter(socket);
        let reading = tokio::spawn(async move {
            let got = read_exactly(&mut client, big.len() + n).await;
            got[..big.len()] == big[..] && got[big.len()..].iter().all(|&b| b == 4)
        });
        write_frames(&mut writer, &batch, TIMING, &mut || false, &mut |_| {})
            .await
            .unwrap();
        assert!(reading.await.unwrap());
    }

    #[tokio::test]
    async fn small_and_large_frames_reach_a_slow_reader_whole_and_in_order() {
        let (socket, mut client) = tcp_pair().await;
        // A small send buffer: the socket takes part of a batch at a time.
        socket2::SockRef::from(&*socket)
            .set_send_buffer_size(4096)
            .unwrap();
        // Runs of small numbered frames (copied into one buffer per write) between large ones
        // (written as they are).
        let frames: Vec<Bytes> = (0..6000u32)
            .map(|i| {
                let len = if i % 1000 == 999 {
                    20_000
                } else {
                    4 + i as usize % 200
                };
                let mut frame = i.to_be_bytes().to_vec();
                frame.resize(len, (i % 251) as u8);
                Bytes::from(frame)
            })
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        let total = expected.len();
        let reading = tokio::spawn(async move {
            let mut got = Vec::with_capacity(total);
            let mut chunk = [0u8; 1500];
            while got.len() < total {
                let n = tokio::io::AsyncReadExt::read(&mut client, &mut chunk)
                    .await
                    .unwrap();
                assert!(n > 0, "closed after {} of {total} bytes", got.len());
                got.extend_from_slice(&chunk[..n]);
                tokio::task::yield_now().await;
            }
            got
        });
        let mut writer = TcpWriter(socket);
        let wrote = write_frames(&mut writer, &frames, TIMING, &mut || false, &mut |_| {})
            .await
            .unwrap();
        assert_eq!(wrote, Wrote::All);
        assert!(reading.await.unwrap() == expected, "bytes differ");
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
        write_frames(&mut a, &frames, TIMING, &mut || false, &mut |_| {})
            .await
            .unwrap();
        drop(a);
        assert_eq!(reader.await.unwrap(), expected);
    }
}
