//! One connection's life: subscribe, `on_connect`, read and dispatch messages, close, clean up,
//! `on_disconnect`.
//!
//! Two tasks serve a connection. This one reads: it parses frames, answers pings, runs the
//! handler, and owns the lifecycle. The writer ([`outbound::run_writer`]) owns the socket's write
//! half and drains the outbound queue. They share only the [`Conn`].
//!
//! Whatever ends the connection — the client's close, a dropped TCP connection, a protocol
//! violation, the slow-consumer policy, shutdown, a panicking handler — the same tail runs once:
//! leave the shard, stop the writer, call `on_disconnect`.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::Instrument;

use crate::frame::{self, FrameParser, Message, MessageAssembler, OpCode, close_code};
use crate::handler::{ConnectionContext, MessageHandler};
use crate::outbound::{self, Conn};
use crate::service::WebsocketService;
use crate::sink::WsSink;

/// Size of one read when the buffer is empty.
const READ_CHUNK: usize = 4096;

/// The read half of an upgraded connection.
pub(crate) enum Inbound {
    /// A TCP stream (the usual case under `axum::serve`).
    Tcp(Arc<TcpStream>),
    /// Any other stream: IO hyper upgraded (TLS, a custom listener), or an in-memory pipe
    /// (the fuzz targets, through `bench_api`).
    Other(Box<dyn AsyncRead + Send + Unpin>),
}

impl Inbound {
    /// Reads what is available into `buf`; `Ok(0)` is end of stream.
    ///
    /// For TCP the buffer is only allocated once the socket is readable, so an idle connection
    /// holds no read buffer at all.
    async fn read_some(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Self::Tcp(r) => loop {
                // `poll_read_ready`, not `readable()`: it takes the socket's reader waker slot,
                // where hyper's connection task left its waker when it handed the socket over.
                // That stale waker kept hyper's finished task (2 KiB) allocated per connection.
                std::future::poll_fn(|cx| r.poll_read_ready(cx)).await?;
                let mut got = None;
                // A read that did not fill the buffer emptied the socket (epoll is
                // edge-triggered), so it also clears the readiness, as tokio's own
                // `poll_read` does; otherwise every message would cost a second `recv` that
                // only returns `EAGAIN`. The read runs inside `try_io` so that the clear
                // applies to the readiness seen before it: data arriving meanwhile sets a
                // newer readiness that the clear leaves alone.
                let res = r.try_io(Interest::READABLE, || {
                    let (n, room) = read_tcp(r, buf)?;
                    got = Some(n);
                    if n > 0 && n < room {
                        Err(std::io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(())
                    }
                });
                match (got, res) {
                    (Some(n), _) => return Ok(n),
                    (None, Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    (None, Err(e)) => return Err(e),
                    (None, Ok(())) => continue,
                }
            },
            Self::Other(r) => {
                if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                    buf.reserve(READ_CHUNK);
                }
                r.read_buf(buf).await
            }
        }
    }
}

/// One `recv` from `socket` into `buf`: how many bytes came, and how many it had room for.
///
/// An empty buffer (the usual case: the previous message was handled and the buffer given
/// back) is filled through a scratch array on the stack, and then holds exactly what came, a
/// small allocation. Reserving a whole chunk per message instead cost a 4 KiB allocation that
/// the allocator often had to take from a fresh, page-faulted page: 7% of a core in the chat
/// test at 30 000 messages/s (PERF.md, section 21b).
fn read_tcp(socket: &TcpStream, buf: &mut BytesMut) -> std::io::Result<(usize, usize)> {
    if buf.is_empty() {
        let mut scratch = [0u8; READ_CHUNK];
        let n = socket.try_read(&mut scratch)?;
        buf.extend_from_slice(&scratch[..n]);
        return Ok((n, READ_CHUNK));
    }
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    let room = buf.capacity() - buf.len();
    Ok((socket.try_read_buf(buf)?, room))
}

/// Why the read loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client sent a close frame; ours is queued in reply.
    ClientClosed,
    /// The TCP stream ended or failed.
    Eof,
    /// We queued a close (violation, slow consumer, shutdown, sink close): wait for the reply.
    ServerClosed,
}

/// Runs the connection to its end. Spawned once per upgraded connection; `conn` was already
/// subscribed to `topic` (`subscribed` says whether that worked) before the 101 was sent.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run<H, W>(
    service: Arc<WebsocketService<H>>,
    conn: Arc<Conn>,
    subscribed: bool,
    mut inbound: Inbound,
    pre_read: BytesMut,
    write: W,
    topic: String,
    user_id: H::UserId,
) where
    H: MessageHandler,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let rt = &service.runtime;
    // One span per connection: every event of this connection (handler errors, protocol
    // violations, close reasons) carries its id, topic and user. The writer's one event names
    // the connection itself; a span there would cost every idle connection 128 bytes.
    let span = tracing::debug_span!("ws", conn_id = %conn.id, topic = %topic, user = ?user_id);
    rt.connection_opened();
    let writer = tokio::spawn(outbound::run_writer(
        conn.clone(),
        write,
        rt.config.write_delay,
        rt.config.write_timeout,
        rt.metrics.clone(),
    ));

    async {
        let ctx = ConnectionContext {
            conn_id: conn.id,
            user_id,
            topic,
            app_state: service.app_state.clone(),
            sink: WsSink::new(conn.clone(), rt.hub.clone()),
        };
        if !subscribed || rt.is_shutting_down() {
            conn.close(close_code::GOING_AWAY, "server shutting down", true);
        }
        // Invariant 6: on_connect runs after the subscription is in place.
        if AssertUnwindSafe(service.handler.on_connect(&ctx))
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!("on_connect panicked");
            conn.close(close_code::INTERNAL_ERROR, "internal error", false);
        }

        let mut buf = pre_read;
        let end = read_loop(&service, &conn, &ctx, &mut inbound, &mut buf).await;
        tracing::debug!(?end, "connection ending");

        match end {
            End::ServerClosed => {
                // Read until the client's close or EOF so unread input does not turn our close
                // into a reset, but no longer than the close timeout.
                let _ = tokio::time::timeout(
                    rt.config.close_timeout,
                    drain_until_close(&mut inbound, &mut buf),
                )
                .await;
            }
            End::Eof => conn.fail(),
            End::ClientClosed => {}
        }
        drop(inbound);
        let mut writer = writer;
        if tokio::time::timeout(rt.config.close_timeout, &mut writer)
            .await
            .is_err()
        {
            // The client stopped reading: its close cannot be delivered. Drop the socket.
            writer.abort();
        }
        conn.detach_socket();
        rt.hub.remove(&conn).await;
        // Invariant 6: on_disconnect runs exactly once, here, whatever ended the connection.
        if AssertUnwindSafe(service.handler.on_disconnect(&ctx))
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!("on_disconnect panicked");
        }
    }
    .instrument(span)
    .await;
    rt.connection_closed();
}

/// Reads and handles frames until the connection must end.
async fn read_loop<H: MessageHandler>(
    service: &WebsocketService<H>,
    conn: &Conn,
    ctx: &ConnectionContext<H::AppState, H::UserId>,
    inbound: &mut Inbound,
    buf: &mut BytesMut,
) -> End {
    let config = &service.runtime.config;
    let max = config.max_message_size;
    let parser = FrameParser::new(max);
    let mut assembler = MessageAssembler::new(max);
    let mut heartbeat = Heartbeat::new(config.ping_interval, config.pong_timeout);
    // One timer for the connection's life, armed at the heartbeat's deadline (when disabled the
    // branch that polls it is off).
    let mut beat = std::pin::pin!(tokio::time::sleep_until(
        heartbeat.deadline().unwrap_or_else(Instant::now)
    ));
    let mut limiter = config
        .rate_limit
        .map(|(rate, burst)| RateLimiter::new(rate, burst, config.rate_limit_grace));
    loop {
        let frame = match parser.parse(buf) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                if buf.is_empty() {
                    // Nothing pending: give the buffer back while we wait.
                    *buf = BytesMut::new();
                } else if let Some((opcode, key, masked)) = frame::incomplete_frame(buf) {
                    // Invalid UTF-8 inside a text frame still arriving fails now, not once
                    // the whole frame is in (RFC 6455 §8.1: fail fast).
                    if let Err(e) = assembler.check_incomplete(opcode, key, masked) {
                        return violation(service, conn, e);
                    }
                }
                tokio::select! {
                    biased;
                    _ = conn.ended() => return End::ServerClosed,
                    read = inbound.read_some(buf) => match read {
                        Ok(0) | Err(_) => return End::Eof,
                        Ok(_) => {
                            heartbeat.heard();
                            continue;
                        }
                    },
                    _ = &mut beat, if heartbeat.deadline().is_some() => {
                        // The timer is not moved when the client is heard (that would cost a
                        // timer update per message); it fires at the old deadline and is set
                        // again to the current one.
                        let due = heartbeat.deadline().unwrap_or_else(Instant::now);
                        if Instant::now() < due {
                            beat.as_mut().reset(due);
                            continue;
                        }
                        if heartbeat.timed_out() {
                            tracing::debug!("heartbeat timeout");
                            conn.close(close_code::GOING_AWAY, "ping timeout", false);
                            return End::ServerClosed;
                        }
                        conn.push_control(frame::encode(OpCode::Ping, b""));
                        heartbeat.pinged();
                        if let Some(at) = heartbeat.deadline() {
                            beat.as_mut().reset(at);
                        }
                        continue;
                    }
                }
            }
            Err(e) => return violation(service, conn, e),
        };
        match frame.opcode {
            OpCode::Ping => conn.push_control(frame::encode(OpCode::Pong, &frame.payload)),
            OpCode::Pong => {}
            OpCode::Close => {
                return match frame::parse_close_payload(&frame.payload) {
                    Ok(code) => {
                        conn.close(code.unwrap_or(close_code::NORMAL), "", true);
                        End::ClientClosed
                    }
                    Err(e) => violation(service, conn, e),
                };
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                let message = match assembler.push(frame) {
                    Ok(None) => continue,
                    Ok(Some(message)) => message,
                    Err(e) => return violation(service, conn, e),
                };
                service.runtime.metrics.message_in();
                match limiter.as_mut().map_or(Admit::Yes, RateLimiter::admit) {
                    Admit::Yes => {}
                    Admit::DropAndTell => {
                        send_error(ctx, "Rate limit exceeded: message dropped");
                        continue;
                    }
                    Admit::Drop => continue,
                    Admit::Close => {
                        conn.close(close_code::POLICY_VIOLATION, "rate limit exceeded", false);
                        return End::ServerClosed;
                    }
                }
                match message {
                    Message::Text(mut text) => {
                        // Boxed: the decode-handle-publish future (a Redis publish among it)
                        // is the largest state of this loop, and a future's size is that of its
                        // largest state. Inline, every idle connection would carry it.
                        let handled =
                            AssertUnwindSafe(Box::pin(handle_text(service, ctx, &mut text)))
                                .catch_unwind()
                                .await;
                        if handled.is_err() {
                            tracing::error!("message handler panicked");
                            conn.close(close_code::INTERNAL_ERROR, "internal error", false);
                            return End::ServerClosed;
                        }
                    }
                    Message::Binary(data) => {
                        let handled =
                            AssertUnwindSafe(service.handler.handle_binary_message(&data, ctx))
                                .catch_unwind()
                                .await;
                        match handled {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => send_error(ctx, &e.client_message()),
                            Err(_) => {
                                tracing::error!("binary message handler panicked");
                                conn.close(close_code::INTERNAL_ERROR, "internal error", false);
                                return End::ServerClosed;
                            }
                        }
                    }
                }
            }
        }
        if conn.is_ending() {
            return End::ServerClosed;
        }
    }
}

/// Server-side heartbeat: ping a connection that has been quiet for `interval`, and give up on
/// it when it then stays silent for `timeout`.
#[derive(Debug)]
struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    last_heard: Instant,
    pinged_at: Option<Instant>,
}

impl Heartbeat {
    fn new(interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            timeout,
            last_heard: Instant::now(),
            pinged_at: None,
        }
    }

    /// When the next ping is due or the pong timeout expires; `None` when disabled.
    fn deadline(&self) -> Option<Instant> {
        if self.interval.is_zero() {
            return None;
        }
        Some(match self.pinged_at {
            Some(at) => at + self.timeout,
            None => self.last_heard + self.interval,
        })
    }

    fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.pinged_at = None;
    }

    fn pinged(&mut self) {
        self.pinged_at = Some(Instant::now());
    }

    fn timed_out(&self) -> bool {
        self.pinged_at.is_some()
    }
}

/// What to do with one inbound message under the rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    Yes,
    /// Drop it and tell the client (first drop of a streak).
    DropAndTell,
    Drop,
    /// Over the limit for longer than the grace period.
    Close,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    grace: Duration,
    /// When the current run of over-limit traffic began, and the last drop in it. A run ends
    /// once a second passes without a drop; a run longer than `grace` closes the connection.
    dropping_since: Option<Instant>,
    last_drop: Option<Instant>,
}

impl RateLimiter {
    fn new(rate: u32, burst: u32, grace: Duration) -> Self {
        Self {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            refilled: Instant::now(),
            grace,
            dropping_since: None,
            last_drop: None,
        }
    }

    fn admit(&mut self) -> Admit {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            if self
                .last_drop
                .is_some_and(|t| now.duration_since(t) > Duration::from_secs(1))
            {
                self.dropping_since = None;
            }
            return Admit::Yes;
        }
        self.last_drop = Some(now);
        match self.dropping_since {
            None => {
                self.dropping_since = Some(now);
                Admit::DropAndTell
            }
            Some(since) if now.duration_since(since) > self.grace => Admit::Close,
            Some(_) => Admit::Drop,
        }
    }
}

fn violation<H: MessageHandler>(
    service: &WebsocketService<H>,
    conn: &Conn,
    e: frame::ProtocolError,
) -> End {
    tracing::debug!(code = e.code, reason = e.reason, "protocol violation");
    service.runtime.metrics.protocol_error();
    // What was already queued (echoes of earlier messages) still goes out, then the close.
    conn.close(e.code, e.reason, true);
    End::ServerClosed
}

/// Parses one text message and routes it: direct handler first, broadcast on `Ok(None)`.
async fn handle_text<H: MessageHandler>(
    service: &WebsocketService<H>,
    ctx: &ConnectionContext<H::AppState, H::UserId>,
    text: &mut [u8],
) {
    let handler = &service.handler;
    // The message buffer is ours and is dropped afterwards: a decoder may parse in place.
    let msg = match handler.decode(text) {
        Ok(msg) => msg,
        Err(e) => {
            send_error(ctx, &e);
            return;
        }
    };
    match handler.handle_direct_message(&msg, ctx).await {
        Ok(Some(reply)) => {
            let _ = ctx.sink.send_json(&reply);
            return;
        }
        Ok(None) => {}
        Err(e) => {
            send_error(ctx, &e.client_message());
            return;
        }
    }
    match handler.handle_broadcast_message(msg, ctx).await {
        Ok(Some(event)) => {
            let published = match serde_json::to_vec(&event) {
                Ok(json) => service.runtime.publish(&ctx.topic, Bytes::from(json)).await,
                Err(e) => Err(crate::broker::PublishError::Serialize(e)),
            };
            if let Err(e) = published {
                tracing::warn!(error = %e, "publish failed");
                send_error(ctx, &format!("Failed to broadcast event: {e}"));
            }
        }
        Ok(None) => {}
        Err(e) => send_error(ctx, &e.client_message()),
    }
}

/// Sends `{"type":"error","message":…}` to this connection alone.
fn send_error<S: Send + Sync, U: Send + Sync>(ctx: &ConnectionContext<S, U>, message: &str) {
    let _ = ctx.sink.send_json(&serde_json::json!({
        "type": "error",
        "message": message,
    }));
}

/// After we sent a close: skip input, frame by frame and without buffering payloads, until the
/// client's close frame or EOF. Reading it all keeps unread input from turning our close into a
/// TCP reset that could destroy the close frame before the client reads it.
async fn drain_until_close(inbound: &mut Inbound, buf: &mut BytesMut) {
    let mut skip: u64 = 0;
    loop {
        if skip > 0 {
            let n = skip.min(buf.len() as u64) as usize;
            buf.advance(n);
            skip -= n as u64;
        }
        if skip == 0 {
            match frame::peek_extent(buf) {
                Some((0x8, _)) => return,
                Some((_, total)) => {
                    skip = total;
                    continue;
                }
                None => {}
            }
        }
        if buf.is_empty() {
            *buf = BytesMut::new();
        }
        match inbound.read_some(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_read_into_an_empty_buffer_allocates_only_what_came() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (mut client, server) = (client.unwrap(), accepted.unwrap().0);
        let mut inbound = Inbound::Tcp(Arc::new(server));

        client.write_all(b"hello").await.unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(inbound.read_some(&mut buf).await.unwrap(), 5);
        assert_eq!(&buf[..], b"hello");
        assert!(buf.capacity() < READ_CHUNK, "holds {}", buf.capacity());

        // A message larger than one chunk arrives over several reads, appended in order.
        let big: Vec<u8> = (0..3 * READ_CHUNK as u32).map(|i| i as u8).collect();
        client.write_all(&big).await.unwrap();
        while buf.len() < 5 + big.len() {
            assert!(inbound.read_some(&mut buf).await.unwrap() > 0);
        }
        assert_eq!(&buf[5..], &big[..]);
    }
}
