//! The application's side of a connection: the [`MessageHandler`] trait the connection task
//! calls, and what it is given ([`ConnectionContext`]). Public at `ws::handler`.
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use axum::http::StatusCode;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::sink::WsSink;

/// A unique identifier for one WebSocket connection.
pub type ConnectionId = uuid::Uuid;

/// A topic name. With Redis it is also the Pub/Sub channel name (plus an optional prefix).
pub type Topic = String;

/// Everything a handler method knows about one connection.
#[derive(Debug)]
pub struct ConnectionContext<S, U>
where
    S: Send + Sync + 'static,
    U: Send + Sync + 'static,
{
    /// Unique id of this connection.
    pub conn_id: ConnectionId,
    /// The authenticated user, as given to [`upgrade_handler`](crate::ws::upgrade::upgrade_handler).
    pub user_id: U,
    /// The topic the connection subscribed to when it opened.
    pub topic: Topic,
    /// The application state the service was built with.
    pub app_state: Arc<S>,
    /// Queues frames for this connection alone.
    pub sink: WsSink,
}

/// An error a handler returns; its text reaches the sender alone as
/// `{"type":"error","message":…}` and the connection stays open.
#[derive(Debug)]
pub enum HandlerError {
    /// A status and an optional message. Without a message, the status text is sent.
    Custom(StatusCode, Option<String>),
    /// A response could not be serialized.
    Serialization(serde_json::Error),
}

impl HandlerError {
    /// The text sent to the client.
    pub fn client_message(&self) -> String {
        match self {
            Self::Custom(_, Some(msg)) => msg.clone(),
            Self::Custom(code, None) => code.to_string(),
            Self::Serialization(e) => format!("Response serialization error: {e}"),
        }
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.client_message())
    }
}

impl std::error::Error for HandlerError {}

impl From<(StatusCode, Option<String>)> for HandlerError {
    fn from((code, msg): (StatusCode, Option<String>)) -> Self {
        Self::Custom(code, msg)
    }
}

impl From<serde_json::Error> for HandlerError {
    fn from(e: serde_json::Error) -> Self {
        Self::Serialization(e)
    }
}

/// Parses one JSON message the way the default [`MessageHandler::decode`] does: with
/// serde_json, which accepts exactly RFC 8259 JSON.
///
/// Not simd-json, though it is faster on large messages (`cargo bench --bench json`: 5.1 µs
/// against 6.9 µs at 4 KiB): fuzzing found simd-json 0.15 accepting input serde_json refuses —
/// a lone `\ud800` escape became U+0000, a high surrogate followed by `\uE000`–`\uFFFF` became
/// a wrong character, and bytes after a 19-digit number or a NUL were skipped. A handler must
/// see the same message whatever its size, so the default parser is the strict one. The buffer
/// is `&mut` so an override may parse in place.
pub fn decode_json<T: DeserializeOwned>(text: &mut [u8]) -> Result<T, String> {
    serde_json::from_slice(text).map_err(|e| format!("Invalid message format: {e}"))
}

/// Your application's side of a WebSocket connection.
#[async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    /// What clients send, parsed from each text message as JSON.
    type ClientMessage: DeserializeOwned + Send + Debug;

    /// What is broadcast to a topic's subscribers, serialized once as JSON per publish.
    type ServerEvent: Serialize + Send + Sync + Debug;

    /// Shared application state (database pools, configuration…).
    type AppState: Send + Sync + 'static;

    /// How users are identified: `i64`, `Uuid`, a small struct…
    type UserId: Send + Sync + Clone + Debug + 'static;

    /// Called once, after the connection is subscribed to its topic. Does nothing by default.
    async fn on_connect(&self, _context: &ConnectionContext<Self::AppState, Self::UserId>) {}

    /// Turns one text message (valid UTF-8, owned by the runtime and free to be modified in
    /// place) into a [`ClientMessage`](Self::ClientMessage). An error's text is sent to the
    /// sender as `{"type":"error","message":…}`.
    ///
    /// The default parses JSON with serde_json (see [`decode_json`]). Override it for another
    /// format.
    fn decode(&self, text: &mut [u8]) -> Result<Self::ClientMessage, String> {
        decode_json(text)
    }

    /// Handles a binary message. The default answers the sender with an error, since clients
    /// are expected to speak JSON text; the connection stays open.
    async fn handle_binary_message(
        &self,
        _data: &[u8],
        _context: &ConnectionContext<Self::AppState, Self::UserId>,
    ) -> Result<(), HandlerError> {
        Err(HandlerError::Custom(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Some("Binary messages are not supported; send JSON text".into()),
        ))
    }

    /// Answers a message to its sender alone.
    ///
    /// `Ok(Some(value))` is serialized and sent to the sender, and the message is done.
    /// `Ok(None)` passes the message on to [`handle_broadcast_message`](Self::handle_broadcast_message).
    /// An error is sent to the sender. The default passes every message on.
    async fn handle_direct_message(
        &self,
        _msg: &Self::ClientMessage,
        _context: &ConnectionContext<Self::AppState, Self::UserId>,
    ) -> Result<Option<Value>, HandlerError> {
        Ok(None)
    }

    /// Turns a message into an event for every subscriber of the connection's topic.
    ///
    /// `Ok(Some(event))` is serialized once and published through the broker to every
    /// subscriber of the topic on every instance, the sender included. `Ok(None)` publishes
    /// nothing.
    async fn handle_broadcast_message(
        &self,
        msg: Self::ClientMessage,
        context: &ConnectionContext<Self::AppState, Self::UserId>,
    ) -> Result<Option<Self::ServerEvent>, HandlerError>;

    /// Called exactly once when the connection has ended, however it ended. Does nothing by
    /// default.
    async fn on_disconnect(&self, _context: &ConnectionContext<Self::AppState, Self::UserId>) {}
}

#[cfg(test)]
mod tests {
    use super::decode_json;

    /// What fuzzing found simd-json accepting: every size must refuse it.
    #[test]
    fn invalid_json_is_refused_at_every_size() {
        for bad in [
            r#"{"s":"\ud800"}"#,
            r#"{"s":"\ud83d\ued00"}"#,
            "{\"flag\":true\u{0}xyz}",
        ] {
            for pad in [0, 4096] {
                let mut text = format!("{bad}{}", " ".repeat(pad)).into_bytes();
                let parsed = decode_json::<serde_json::Value>(&mut text);
                assert!(parsed.is_err(), "{bad:?} padded by {pad} was accepted");
            }
        }
    }
}
