//! The chat the library tests talk to: `{"SendMessage":{"room":R,"text":T}}` broadcasts
//! `{"NewMessage":{"room":R,"username":<name>,"text":T}}` to topic `R`, which must be the
//! connection's own; `"Ping"` is answered `"Pong"` to the sender alone. A token is
//! `<id>:<name>` and every topic is open.
//!
//! The same protocol as the `basic_chat` example, but the tests' own: they do not depend on the
//! example's code or its global allocator. The example's tests run it as a process.

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum_realtime_kit::WebsocketServiceBuilder;
use axum_realtime_kit::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
pub enum ClientMessage {
    SendMessage { room: String, text: String },
    Ping,
}

/// Users are known by their name.
#[derive(Debug)]
pub struct ChatHandler;

#[async_trait]
impl MessageHandler for ChatHandler {
    type ClientMessage = ClientMessage;
    type ServerEvent = Value;
    type AppState = ();
    type UserId = String;

    async fn handle_direct_message(
        &self,
        msg: &ClientMessage,
        _ctx: &ConnectionContext<(), String>,
    ) -> Result<Option<Value>, HandlerError> {
        Ok(matches!(msg, ClientMessage::Ping).then(|| json!("Pong")))
    }

    async fn handle_broadcast_message(
        &self,
        msg: ClientMessage,
        ctx: &ConnectionContext<(), String>,
    ) -> Result<Option<Value>, HandlerError> {
        let ClientMessage::SendMessage { room, text } = msg else {
            return Ok(None);
        };
        if room != ctx.topic {
            let why = format!("Cannot send to room '{room}' from topic '{}'", ctx.topic);
            return Err(HandlerError::Custom(StatusCode::BAD_REQUEST, Some(why)));
        }
        let username = &ctx.user_id;
        Ok(Some(
            json!({"NewMessage": {"room": room, "username": username, "text": text}}),
        ))
    }
}

/// A service builder for the chat, to configure and build.
pub fn builder() -> WebsocketServiceBuilder<ChatHandler> {
    WebsocketService::builder(ChatHandler, Arc::new(()))
}

/// The router's state: the service, and the token check.
#[derive(Clone)]
struct Tokens(Arc<WebsocketService<ChatHandler>>);

#[async_trait]
impl TokenValidator for Tokens {
    type User = String;
    type Error = std::fmt::Error;

    async fn validate_token(&self, token: &str) -> Result<String, std::fmt::Error> {
        let (_, name) = token.split_once(':').ok_or(std::fmt::Error)?;
        Ok(name.to_owned())
    }
}

/// `GET /ws/{topic}`: 401 without a token, then any topic.
pub fn router(service: Arc<WebsocketService<ChatHandler>>) -> axum::Router {
    let ws = |ws: WebSocketUpgrade,
              State(Tokens(service)): State<Tokens>,
              Path(topic): Path<String>,
              WsAuth(user): WsAuth<String>| async move {
        upgrade_handler(ws, State(service), user, topic, |_, _, _| async { Ok(()) }).await
    };
    axum::Router::new()
        .route("/ws/{topic}", get(ws))
        .with_state(Tokens(service))
}
