//! Load-test peer: the published `axum-realtime-kit` 0.1.0 (renamed `seedkit` here), used the way
//! a user of that release would, through its public API only, serving the `basic_chat` example's
//! protocol (its module docs). Deliberately not tuned.
//!
//! Environment: `BIND_ADDR` (default `127.0.0.1:3000`), `REDIS_URL` (required).

use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use rtk_peers::{BadToken, ClientMessage, ServerEvent, User};
use seedkit::auth::{TokenValidator, WsAuth};
use seedkit::ws::handler::{ConnectionContext, HandlerError, MessageHandler};
use seedkit::ws::service::WebsocketService;
use seedkit::ws::upgrade::upgrade_handler;

/// Application state of the service: it only checks tokens.
#[derive(Debug, Clone, Default)]
struct Tokens;

#[async_trait]
impl TokenValidator for Tokens {
    type User = User;
    type Error = BadToken;

    async fn validate_token(&self, token: &str) -> Result<User, BadToken> {
        rtk_peers::parse_token(token)
    }
}

/// The chat logic plugged into the 0.1.0 service.
#[derive(Debug)]
struct Chat;

#[async_trait]
impl MessageHandler for Chat {
    type ClientMessage = ClientMessage;
    type ServerEvent = ServerEvent;
    type AppState = Tokens;
    type UserId = User;

    async fn handle_direct_message(
        &self,
        msg: &ClientMessage,
        _ctx: &ConnectionContext<Tokens, User>,
    ) -> Result<Option<serde_json::Value>, HandlerError> {
        match msg {
            ClientMessage::Ping => Ok(Some(serde_json::to_value(ServerEvent::Pong)?)),
            ClientMessage::SendMessage { .. } => Ok(None),
        }
    }

    async fn handle_broadcast_message(
        &self,
        msg: ClientMessage,
        ctx: &ConnectionContext<Tokens, User>,
    ) -> Result<Option<ServerEvent>, HandlerError> {
        match msg {
            ClientMessage::SendMessage { room, text } => {
                if room != ctx.topic {
                    return Err(HandlerError::Custom(
                        StatusCode::BAD_REQUEST,
                        Some(rtk_peers::wrong_room_message(&room, &ctx.topic)),
                    ));
                }
                Ok(Some(ServerEvent::NewMessage {
                    room,
                    username: ctx.user_id.name.clone(),
                    text,
                }))
            }
            ClientMessage::Ping => Ok(None),
        }
    }
}

/// The router's state: `WsAuth` needs it to validate tokens.
#[derive(Clone)]
struct RouterState {
    tokens: Arc<Tokens>,
    service: Arc<WebsocketService<Chat>>,
}

#[async_trait]
impl TokenValidator for RouterState {
    type User = User;
    type Error = BadToken;

    async fn validate_token(&self, token: &str) -> Result<User, BadToken> {
        self.tokens.validate_token(token).await
    }
}

async fn validate_topic(_tokens: Arc<Tokens>, user: User, topic: String) -> Result<(), StatusCode> {
    rtk_peers::check_topic(&user, &topic)
        .map_err(|denied| StatusCode::from_u16(denied.status()).unwrap_or(StatusCode::NOT_FOUND))
}

async fn ws_route(
    ws: WebSocketUpgrade,
    State(state): State<RouterState>,
    Path(topic): Path<String>,
    WsAuth(user): WsAuth<User>,
) -> Response {
    upgrade_handler(ws, State(state.service), user, topic, validate_topic).await
}

#[tokio::main]
async fn main() {
    let addr = rtk_peers::bind_addr();
    let redis_url = rtk_peers::redis_url("peer_reference");

    let tokens = Arc::new(Tokens);
    let service = WebsocketService::new(&redis_url, Chat, Arc::clone(&tokens));
    let app = Router::new()
        .route("/ws/{topic}", get(ws_route))
        .route("/health", get(|| async { "OK" }))
        .with_state(RouterState { tokens, service });

    let listener = rtk_peers::listen("peer_reference", addr);
    eprintln!("peer_reference (axum-realtime-kit 0.1.0) listening on {addr}");
    tokio::select! {
        served = axum::serve(listener, app) => {
            if let Err(e) = served {
                eprintln!("peer_reference: server error: {e}");
                std::process::exit(1);
            }
        }
        () = axum_realtime_kit::shutdown_signal() => {}
    }
    std::process::exit(0);
}
