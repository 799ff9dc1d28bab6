//! The reader: takes bytes off the socket, parses frames, answers control frames, and hands
//! each complete message to the application's handler.
//!
//! [`read_loop`] runs these steps until the connection must end:
//! 1. **parse** a frame off the buffer ([`FrameParser`]);
//! 2. none complete → **wait** for input, the end of the connection, or the heartbeat
//!    ([`Reader::wait`]);
//! 3. a control frame → answer it (**pong**, **close**); a data frame → **assemble** it into a
//!    message ([`Reader::on_frame`]);
//! 4. a complete message → the **rate limit**, then the **handler** ([`Reader::on_message`]).
//!
//! Nothing a client sends can panic it or grow its memory past the configured limits
//! (invariant 7, docs/architecture.md): frames and messages are bounded by
//! `max_message_size`, invalid UTF-8 fails as soon as it arrives, and a panicking handler closes
//! only its own connection.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, Interest};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::End;
use super::pacing::{Admit, Heartbeat, RateLimiter};
use crate::frame::{self, Frame, FrameParser, Message, MessageAssembler, OpCode, close_code};
use crate::handler::{ConnectionContext, MessageHandler};
use crate::outbound::Conn;
use crate::runtime::JoinOutcome;
use crate::service::WebsocketService;
use crate::wire::Format;

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
    pub(super) async fn read_some(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
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
/// test at 30 000 messages/s (docs/performance-notes.md#chat-path-profile).
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

/// What the reader works with, for the steps of [`read_loop`].
struct Reader<'a, H: MessageHandler> {
    service: &'a WebsocketService<H>,
    conn: &'a Arc<Conn>,
    ctx: &'a ConnectionContext<H::AppState, H::UserId>,
    inbound: &'a mut Inbound,
    buf: &'a mut BytesMut,
    assembler: MessageAssembler,
    heartbeat: Heartbeat,
    limiter: Option<RateLimiter>,
}

/// Reads and handles frames until the connection must end.
pub(super) async fn read_loop<H: MessageHandler>(
    service: &WebsocketService<H>,
    conn: &Arc<Conn>,
    ctx: &ConnectionContext<H::AppState, H::UserId>,
    inbound: &mut Inbound,
    buf: &mut BytesMut,
) -> End {
    let config = &service.runtime.config;
    let max = config.max_message_size;
    let parser = FrameParser::new(max).with_deflate(conn.deflate().is_some());
    let mut reader = Reader {
        service,
        conn,
        ctx,
        inbound,
        buf,
        assembler: MessageAssembler::new(max),
        heartbeat: Heartbeat::new(config.ping_interval),
        limiter: config.rate_limit.map(|(_, burst)| RateLimiter::new(burst)),
    };
    // One timer for the connection's life, armed at the heartbeat's deadline (when disabled the
    // branch that polls it is off).
    let mut beat = std::pin::pin!(tokio::time::sleep_until(
        reader.deadline().unwrap_or_else(Instant::now)
    ));
    loop {
        // A continuation frame that would take the message past its limit is refused from its
        // header, before its payload is buffered.
        let room = reader.assembler.continuation_room();
        let step = match parser.parse_for(reader.buf, room) {
            Ok(Some(frame)) => {
                let step = match reader.on_frame(frame) {
                    Ok(None) => None,
                    Ok(Some(message)) => reader.on_message(message).await,
                    Err(end) => Some(end),
                };
                match step {
                    None if reader.conn.is_ending() => Some(End::ServerClosed),
                    step => step,
                }
            }
            Ok(None) => reader.wait(beat.as_mut()).await,
            Err(e) => Some(reader.violation(e)),
        };
        if let Some(end) = step {
            return end;
        }
    }
}

impl<H: MessageHandler> Reader<'_, H> {
    /// The heartbeat's next deadline under the configured interval and timeout.
    fn deadline(&self) -> Option<Instant> {
        let config = &self.service.runtime.config;
        self.heartbeat
            .deadline(config.ping_interval, config.pong_timeout)
    }

    /// No complete frame is buffered: waits for more input, for the connection to end, or for
    /// the heartbeat's deadline. `Some` when the connection must end.
    async fn wait(&mut self, mut beat: Pin<&mut Sleep>) -> Option<End> {
        if self.buf.is_empty() {
            // Nothing pending: give the buffer back while we wait.
            *self.buf = BytesMut::new();
        } else if let Some((opcode, key, masked)) = frame::incomplete_frame(self.buf) {
            // Invalid UTF-8 inside a text frame still arriving fails now, not once the whole
            // frame is in (RFC 6455 §8.1: fail fast). The assembler validates only the bytes
            // that came since the last check, so a frame trickled in one byte per read costs
            // linear time, not quadratic.
            if let Err(e) = self.assembler.check_incomplete(opcode, key, masked) {
                return Some(self.violation(e));
            }
        }
        tokio::select! {
            biased;
            _ = self.conn.ended() => Some(End::ServerClosed),
            read = self.inbound.read_some(self.buf) => match read {
                Ok(0) | Err(_) => Some(End::Eof),
                Ok(_) => {
                    self.heartbeat.heard();
                    None
                }
            },
            _ = &mut beat, if self.deadline().is_some() => self.on_beat(beat),
        }
    }

    /// The heartbeat timer fired. It is not moved when the client is heard (that would cost a
    /// timer update per message): it fires at the old deadline and is set again to the current
    /// one. Past the pong timeout the connection ends; otherwise a ping goes out.
    fn on_beat(&mut self, mut beat: Pin<&mut Sleep>) -> Option<End> {
        let due = self.deadline().unwrap_or_else(Instant::now);
        if Instant::now() < due {
            beat.as_mut().reset(due);
            return None;
        }
        if self.heartbeat.timed_out() {
            tracing::debug!("heartbeat timeout");
            self.conn
                .close(close_code::GOING_AWAY, "ping timeout", false);
            return Some(End::ServerClosed);
        }
        self.conn.push_control(frame::encode(OpCode::Ping, b""));
        self.heartbeat.pinged();
        if let Some(at) = self.deadline() {
            beat.as_mut().reset(at);
        }
        None
    }

    /// One parsed frame: control frames are answered here, data frames assembled into messages.
    /// A message it completes is returned, for [`on_message`](Self::on_message); `Err` when the
    /// connection must end.
    ///
    /// Not `async`: the frame would otherwise be kept in the reader's future next to the
    /// handler's, in room every idle connection carries.
    fn on_frame(&mut self, frame: Frame) -> Result<Option<Message>, End> {
        match frame.opcode {
            OpCode::Ping => {
                self.conn
                    .push_control(frame::encode(OpCode::Pong, &frame.payload));
                Ok(None)
            }
            OpCode::Pong => Ok(None),
            OpCode::Close => Err(match frame::parse_close_payload(&frame.payload) {
                Ok(code) => {
                    self.conn
                        .close(code.unwrap_or(close_code::NORMAL), "", true);
                    End::ClientClosed
                }
                Err(e) => self.violation(e),
            }),
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                self.assembler.push(frame).map_err(|e| self.violation(e))
            }
        }
    }

    /// One complete message: counted, rate-limited, then handed to the handler. A panicking
    /// handler closes this connection with 1011 and nothing else.
    async fn on_message(&mut self, message: Message) -> Option<End> {
        let (service, conn, ctx) = (self.service, self.conn, self.ctx);
        service.runtime.metrics.message_in();
        let config = &self.service.runtime.config;
        let admit = match (&mut self.limiter, config.rate_limit) {
            (Some(limiter), Some(limit)) => limiter.admit(limit, config.rate_limit_grace),
            _ => Admit::Yes,
        };
        match admit {
            Admit::Yes => {}
            Admit::DropAndTell => {
                send_error(ctx, "Rate limit exceeded: message dropped");
                return None;
            }
            Admit::Drop => return None,
            Admit::Close => {
                conn.close(close_code::POLICY_VIOLATION, "rate limit exceeded", false);
                return Some(End::ServerClosed);
            }
        }
        match message {
            Message::Text(mut text) if conn.format == Format::Rtk1 && is_command(&text) => {
                let handled =
                    AssertUnwindSafe(Box::pin(rtk1_command(service, conn, ctx, &mut text)))
                        .catch_unwind()
                        .await;
                if handled.is_err() {
                    tracing::error!("the topic rule or the message handler panicked");
                    conn.close(close_code::INTERNAL_ERROR, "internal error", false);
                    return Some(End::ServerClosed);
                }
            }
            Message::Text(mut text) => {
                // Boxed: the decode-handle-publish future (a Redis publish among it) is the
                // largest state of this loop, and a future's size is that of its largest state.
                // Inline, every idle connection would carry it.
                let handled = AssertUnwindSafe(Box::pin(handle_text(service, ctx, &mut text)))
                    .catch_unwind()
                    .await;
                if handled.is_err() {
                    tracing::error!("message handler panicked");
                    conn.close(close_code::INTERNAL_ERROR, "internal error", false);
                    return Some(End::ServerClosed);
                }
            }
            Message::Binary(data) => {
                let handled = AssertUnwindSafe(service.handler.handle_binary_message(&data, ctx))
                    .catch_unwind()
                    .await;
                match handled {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => send_error(ctx, &e.client_message()),
                    Err(_) => {
                        tracing::error!("binary message handler panicked");
                        conn.close(close_code::INTERNAL_ERROR, "internal error", false);
                        return Some(End::ServerClosed);
                    }
                }
            }
        }
        None
    }

    /// A protocol violation: counted, and the connection closed with its code after what was
    /// already queued (echoes of earlier messages).
    fn violation(&self, e: frame::ProtocolError) -> End {
        tracing::debug!(code = e.code, reason = e.reason, "protocol violation");
        self.service.runtime.metrics.protocol_error();
        self.conn.close(e.code, e.reason, true);
        End::ServerClosed
    }
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
                // The detail (the broker's address, the OS error) is for the log, not clients.
                use crate::broker::PublishError as E;
                let why = match e {
                    E::Unavailable(_) => "broker unavailable",
                    E::Timeout => "broker did not confirm in time",
                    E::Closed => "service is shutting down",
                    E::Serialize(_) => "event could not be serialized",
                    E::NotText => "event is not text",
                };
                send_error(ctx, &format!("Failed to broadcast event: {why}"));
            }
        }
        Ok(None) => {}
        Err(e) => send_error(ctx, &e.client_message()),
    }
}

/// A command of the `rtk1` protocol; any other message goes to the application's handler.
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Command {
    /// Join a topic, recovering from a position if given.
    Subscribe {
        topic: String,
        #[serde(default)]
        since: Option<Since>,
    },
    /// Leave a topic.
    Unsubscribe { topic: String },
    /// Who is in a topic.
    Presence { topic: String },
}

/// A position the client has: `{"o":N,"e":E}`.
#[derive(Debug, serde::Deserialize)]
struct Since {
    o: u64,
    e: String,
}

/// Whether `text` may be an `rtk1` command: a JSON object that names one (a cheap check, so
/// the application's messages are parsed only once).
fn is_command(text: &[u8]) -> bool {
    let trimmed = text.trim_ascii_start();
    trimmed.first() == Some(&b'{')
        && [&b"\"subscribe\""[..], b"\"unsubscribe\"", b"\"presence\""]
            .iter()
            .any(|name| text.windows(name.len()).any(|w| w == *name))
}

/// Runs an `rtk1` `subscribe`, `unsubscribe` or `presence` command. A message that names a command but is
/// not one goes to the handler, as any other message.
async fn rtk1_command<H: MessageHandler>(
    service: &WebsocketService<H>,
    conn: &Arc<Conn>,
    ctx: &ConnectionContext<H::AppState, H::UserId>,
    text: &mut [u8],
) {
    let command = match serde_json::from_slice::<Command>(text) {
        Ok(command) => command,
        Err(_) => {
            Box::pin(handle_text(service, ctx, text)).await;
            return;
        }
    };
    let hub = &service.runtime.hub;
    match command {
        Command::Unsubscribe { topic } => hub.leave(conn, &topic).await,
        Command::Presence { topic } => {
            // The connection's own topic needs no check; another is authorised as a subscribe.
            if topic != ctx.topic {
                if let Err(why) = crate::topic::check(&topic, hub.max_topic_len) {
                    send_topic_error(ctx, &topic, &format!("presence {topic}: {why}"));
                    return;
                }
                let allowed = match &service.topic_rule {
                    Some(rule) => {
                        rule(
                            service.app_state.clone(),
                            ctx.user_id.clone(),
                            topic.clone(),
                        )
                        .await
                    }
                    None => Err(axum::http::StatusCode::FORBIDDEN),
                };
                if let Err(status) = allowed {
                    send_topic_error(ctx, &topic, &format!("presence {topic} refused: {status}"));
                    return;
                }
            }
            let limit = crate::presence::REPLY_MAX_USERS;
            match hub.presence.list(&topic, None, limit).await {
                Ok(page) => {
                    let frame = crate::presence::reply_frame(&topic, &page.users);
                    let _ = ctx.sink.send_frame(frame);
                }
                Err(e) => send_topic_error(ctx, &topic, &format!("presence {topic}: {e}")),
            }
        }
        Command::Subscribe { topic, since } => {
            if let Err(why) = crate::topic::check(&topic, hub.max_topic_len) {
                send_error(ctx, &format!("subscribe {topic}: {why}"));
                return;
            }
            let Some(rule) = &service.topic_rule else {
                send_error(ctx, "subscribe commands are not enabled on this server");
                return;
            };
            let allowed = rule(
                service.app_state.clone(),
                ctx.user_id.clone(),
                topic.clone(),
            )
            .await;
            if let Err(status) = allowed {
                send_error(ctx, &format!("subscribe {topic} refused: {status}"));
                return;
            }
            // A subscribe to a topic the connection is in starts over from the position given
            // (after `insufficient_state`, say): leave first, so nothing is sent twice. It
            // stays present meanwhile: no `leave` and `join` for a resubscribe.
            hub.leave_shard(conn, &topic).await;
            let since = since.map(|s| (s.e, s.o));
            match hub
                .join_from(conn, &topic, since, ctx.sink.identity())
                .await
            {
                JoinOutcome::Subscribed | JoinOutcome::Gone => {}
                JoinOutcome::TooManyTopics => {
                    hub.presence.remove(&topic, conn.id).await;
                    send_error(ctx, &format!("subscribe {topic}: too many topics"));
                }
                JoinOutcome::Refused(why) => {
                    tracing::warn!(reason = %why, %topic, "the broker refused a topic");
                    send_error(ctx, &format!("subscribe {topic}: refused by the broker"));
                }
            }
        }
    }
}

/// Sends `{"type":"error","message":…}` to this connection alone.
fn send_error<S: Send + Sync, U: Send + Sync>(ctx: &ConnectionContext<S, U>, message: &str) {
    let _ = ctx.sink.send_json(&serde_json::json!({
        "type": "error",
        "message": message,
    }));
}

/// Sends `{"type":"error","topic":T,"message":…}`: the answer to a request about `topic` that
/// failed, so a client can tell which request it answers.
fn send_topic_error<S: Send + Sync, U: Send + Sync>(
    ctx: &ConnectionContext<S, U>,
    topic: &str,
    message: &str,
) {
    let _ = ctx.sink.send_json(&serde_json::json!({
        "type": "error",
        "topic": topic,
        "message": message,
    }));
}

/// After we sent a close: skip input, frame by frame and without buffering payloads, until the
/// client's close frame or EOF. Reading it all keeps unread input from turning our close into a
/// TCP reset that could destroy the close frame before the client reads it.
pub(super) async fn drain_until_close(inbound: &mut Inbound, buf: &mut BytesMut) {
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
