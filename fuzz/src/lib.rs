//! What the fuzz targets share: a small [`MessageHandler`] in the style of the `basic_chat`
//! example, its message types, and a checker for what the server writes.
//!
//! The handler uses every way a handler can answer: a direct reply, a broadcast through the
//! broker, an error, a binary frame, joining and leaving topics, closing the connection. It
//! never panics on purpose: under libFuzzer any panic, even one the runtime catches, aborts the
//! run and is reported as a crash.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use axum_realtime_kit::bench_api;
use axum_realtime_kit::prelude::*;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What clients send, as JSON text: externally tagged, like `{"Echo":"hi"}` or `"Ping"`.
#[derive(Debug, Deserialize, PartialEq)]
pub enum ClientMessage {
    /// Broadcast `text` to `room`, which must be the connection's topic.
    SendMessage {
        /// Target room.
        room: String,
        /// The text.
        text: String,
    },
    /// Answered with `"Pong"`.
    Ping,
    /// Answered with the same string.
    Echo(String),
    /// Subscribe to one more topic.
    Join {
        /// The topic.
        topic: String,
    },
    /// Unsubscribe from a topic.
    Leave {
        /// The topic.
        topic: String,
    },
    /// Close the connection with an application close code (3000 + `code` % 2000).
    Close {
        /// Chooses the code.
        code: u16,
        /// The reason sent along.
        reason: String,
    },
    /// Answered with these bytes as a binary frame.
    Binary(Vec<u8>),
    /// Broadcast as a [`ServerEvent::Data`]: numbers, a list and free-form JSON.
    Data {
        /// An unsigned integer.
        id: u64,
        /// A signed integer.
        delta: i64,
        /// A float.
        score: f64,
        /// A flag.
        flag: bool,
        /// Strings.
        tags: Vec<String>,
        /// Any JSON value, or absent.
        extra: Option<Value>,
    },
}

/// What the handler broadcasts.
#[derive(Debug, Serialize)]
pub enum ServerEvent {
    /// A chat line.
    NewMessage {
        /// The room.
        room: String,
        /// The sender.
        user: u32,
        /// The text.
        text: String,
    },
    /// The fields of [`ClientMessage::Data`], sent back.
    Data {
        /// See [`ClientMessage::Data`].
        id: u64,
        /// See [`ClientMessage::Data`].
        delta: i64,
        /// See [`ClientMessage::Data`].
        score: f64,
        /// See [`ClientMessage::Data`].
        flag: bool,
        /// See [`ClientMessage::Data`].
        tags: Vec<String>,
        /// See [`ClientMessage::Data`].
        extra: Option<Value>,
    },
}

/// Application state: how often each lifecycle hook ran, to check that every connection that
/// started also ended, exactly once.
#[derive(Debug, Default)]
pub struct Counters {
    /// `on_connect` calls.
    pub connects: AtomicU64,
    /// `on_disconnect` calls.
    pub disconnects: AtomicU64,
}

impl Counters {
    /// `(on_connect calls, on_disconnect calls)`.
    pub fn get(&self) -> (u64, u64) {
        (
            self.connects.load(Ordering::SeqCst),
            self.disconnects.load(Ordering::SeqCst),
        )
    }
}

/// Binary messages longer than this are refused with an error instead of echoed.
pub const MAX_BINARY_ECHO: usize = 1024;

/// Topic names the handler joins or leaves are cut to this many bytes or refused.
pub const MAX_TOPIC: usize = 64;

/// The test handler. `decode` is the trait's default (JSON through `decode_json`).
#[derive(Debug, Default)]
pub struct FuzzHandler;

fn bad_request(why: &str) -> HandlerError {
    HandlerError::Custom(StatusCode::BAD_REQUEST, Some(why.to_owned()))
}

#[async_trait]
impl MessageHandler for FuzzHandler {
    type ClientMessage = ClientMessage;
    type ServerEvent = ServerEvent;
    type AppState = Counters;
    type UserId = u32;

    async fn on_connect(&self, ctx: &ConnectionContext<Counters, u32>) {
        ctx.app_state.connects.fetch_add(1, Ordering::SeqCst);
    }

    async fn handle_binary_message(
        &self,
        data: &[u8],
        ctx: &ConnectionContext<Counters, u32>,
    ) -> Result<(), HandlerError> {
        if data.len() > MAX_BINARY_ECHO {
            return Err(HandlerError::Custom(StatusCode::PAYLOAD_TOO_LARGE, None));
        }
        // A closed connection refuses the frame; that is not the client's error.
        let _ = ctx.sink.send_binary(data);
        Ok(())
    }

    async fn handle_direct_message(
        &self,
        msg: &ClientMessage,
        ctx: &ConnectionContext<Counters, u32>,
    ) -> Result<Option<Value>, HandlerError> {
        match msg {
            ClientMessage::Ping => Ok(Some(json!("Pong"))),
            ClientMessage::Echo(s) => Ok(Some(Value::String(s.clone()))),
            ClientMessage::Join { topic } => {
                if topic.is_empty() || topic.len() > MAX_TOPIC {
                    return Err(bad_request("bad topic"));
                }
                match ctx.sink.join(topic).await {
                    Ok(()) => Ok(Some(json!({ "joined": topic }))),
                    Err(e) => Err(bad_request(&e.to_string())),
                }
            }
            ClientMessage::Leave { topic } => {
                if topic.len() > MAX_TOPIC {
                    return Err(bad_request("bad topic"));
                }
                ctx.sink.leave(topic).await;
                Ok(Some(json!({ "left": topic })))
            }
            ClientMessage::Close { code, reason } => {
                ctx.sink.close(3000 + code % 2000, reason);
                Ok(Some(json!("closing")))
            }
            ClientMessage::Binary(bytes) => {
                let _ = ctx.sink.send_binary(bytes);
                Ok(Some(json!({ "sent": bytes.len() })))
            }
            ClientMessage::SendMessage { room, .. } if *room != ctx.topic => {
                Err(HandlerError::Custom(StatusCode::FORBIDDEN, None))
            }
            ClientMessage::SendMessage { .. } | ClientMessage::Data { .. } => Ok(None),
        }
    }

    async fn handle_broadcast_message(
        &self,
        msg: ClientMessage,
        ctx: &ConnectionContext<Counters, u32>,
    ) -> Result<Option<ServerEvent>, HandlerError> {
        Ok(match msg {
            ClientMessage::SendMessage { room, text } => Some(ServerEvent::NewMessage {
                room,
                user: ctx.user_id,
                text,
            }),
            ClientMessage::Data {
                id,
                delta,
                score,
                flag,
                tags,
                extra,
            } => Some(ServerEvent::Data {
                id,
                delta,
                score,
                flag,
                tags,
                extra,
            }),
            _ => None,
        })
    }

    async fn on_disconnect(&self, ctx: &ConnectionContext<Counters, u32>) {
        ctx.app_state.disconnects.fetch_add(1, Ordering::SeqCst);
    }
}

/// Checks a byte stream the server wrote, as a strict client would: a sequence of complete,
/// final, unmasked frames with valid opcodes; text frames hold JSON; control frames are at most
/// 125 bytes; a close frame carries a valid code and nothing follows it.
///
/// # Panics
/// On the first violation, naming it.
pub fn check_server_output(mut out: &[u8]) {
    let mut closed = false;
    while !out.is_empty() {
        assert!(!closed, "server wrote after its close frame");
        assert!(out.len() >= 2, "server output ends inside a frame header");
        let (b0, b1) = (out[0], out[1]);
        assert_eq!(b0 & 0x80, 0x80, "server frame is not final");
        assert_eq!(b0 & 0x70, 0, "server frame has reserved bits set");
        assert_eq!(b1 & 0x80, 0, "server frame is masked");
        let (len, header) = match b1 & 0x7F {
            126 => {
                assert!(out.len() >= 4, "server output ends inside a frame header");
                let len = u16::from_be_bytes([out[2], out[3]]) as usize;
                assert!(len >= 126, "server frame length not in its shortest form");
                (len, 4)
            }
            127 => {
                assert!(out.len() >= 10, "server output ends inside a frame header");
                let len = u64::from_be_bytes(out[2..10].try_into().unwrap());
                assert!(len > 0xFFFF, "server frame length not in its shortest form");
                (usize::try_from(len).unwrap(), 10)
            }
            n => (n as usize, 2),
        };
        assert!(
            out.len() - header >= len,
            "server output ends inside a frame payload"
        );
        let payload = &out[header..header + len];
        match b0 & 0x0F {
            0x1 => {
                let text = std::str::from_utf8(payload).expect("server text frame is not UTF-8");
                serde_json::from_str::<Value>(text).expect("server text frame is not JSON");
            }
            0x2 => {}
            0x8 => {
                assert!(len <= 125, "server close frame over 125 bytes");
                match bench_api::parse_close_payload(payload) {
                    Ok(Some(_)) => {}
                    other => panic!("server close frame is invalid: {other:?} for {payload:?}"),
                }
                closed = true;
            }
            0x9 | 0xA => assert!(len <= 125, "server control frame over 125 bytes"),
            op => panic!("server frame with opcode {op:#x}"),
        }
        out = &out[header + len..];
    }
}
