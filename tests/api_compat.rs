//! Code written against 0.1.0's README and `basic_chat` compiles and runs here, with the one
//! documented change: the upgrade extractor is `axum_realtime_kit::ws::upgrade::WebSocketUpgrade`.

use std::sync::Arc;

use async_trait::async_trait;
use axum::{
    Router,
    extract::{Path as AxumPath, State},
    http::StatusCode,
    routing::get,
};
use axum_realtime_kit::{
    auth::{TokenValidator, WsAuth},
    prelude::*,
    ws::handler::HandlerError,
    ws::upgrade::WebSocketUpgrade, // 0.1.0: axum::extract::WebSocketUpgrade
};
use serde::{Deserialize, Serialize};

#[derive(Debug)]
struct AuthError(String);

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for AuthError {}

#[derive(Debug, Clone)]
struct User {
    id: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum ClientMessage {
    Say { text: String },
    Ping,
}

#[derive(Debug, Clone, Serialize)]
enum ServerEvent {
    Said { text: String },
    Pong,
}

#[derive(Clone)]
struct AppState {
    secret: String,
}

#[async_trait]
impl TokenValidator for AppState {
    type User = User;
    type Error = AuthError;

    async fn validate_token(&self, token: &str) -> Result<Self::User, Self::Error> {
        if token == self.secret {
            Ok(User { id: 1 })
        } else {
            Err(AuthError("bad token".into()))
        }
    }
}

struct ChatMessageHandler;

#[async_trait]
impl MessageHandler for ChatMessageHandler {
    type ClientMessage = ClientMessage;
    type ServerEvent = ServerEvent;
    type AppState = AppState;
    type UserId = i64;

    async fn on_connect(&self, context: &ConnectionContext<Self::AppState, Self::UserId>) {
        let _ = (
            &context.conn_id,
            &context.user_id,
            &context.topic,
            &context.app_state,
        );
    }

    async fn handle_direct_message(
        &self,
        msg: &Self::ClientMessage,
        _context: &ConnectionContext<Self::AppState, Self::UserId>,
    ) -> Result<Option<serde_json::Value>, HandlerError> {
        match msg {
            ClientMessage::Ping => Ok(Some(
                serde_json::to_value(ServerEvent::Pong).map_err(HandlerError::Serialization)?,
            )),
            _ => Ok(None),
        }
    }

    async fn handle_broadcast_message(
        &self,
        msg: Self::ClientMessage,
        _context: &ConnectionContext<Self::AppState, Self::UserId>,
    ) -> Result<Option<Self::ServerEvent>, HandlerError> {
        match msg {
            ClientMessage::Say { text } if text.is_empty() => Err(HandlerError::Custom(
                StatusCode::BAD_REQUEST,
                Some("empty".to_string()),
            )),
            ClientMessage::Say { text } => Ok(Some(ServerEvent::Said { text })),
            ClientMessage::Ping => Ok(None),
        }
    }

    async fn on_disconnect(&self, _context: &ConnectionContext<Self::AppState, Self::UserId>) {}
}

async fn validate_topic_access(
    _app_state: Arc<AppState>,
    user_id: i64,
    topic: String,
) -> Result<(), StatusCode> {
    if topic.starts_with("private-") && user_id != 123 {
        return Err(StatusCode::FORBIDDEN);
    }
    Ok(())
}

#[derive(Clone)]
struct ServerState {
    app_state: Arc<AppState>,
    ws_service: Arc<WebsocketService<ChatMessageHandler>>,
}

#[async_trait]
impl TokenValidator for ServerState {
    type User = User;
    type Error = AuthError;

    async fn validate_token(&self, token: &str) -> Result<Self::User, Self::Error> {
        self.app_state.validate_token(token).await
    }
}

// The closure is written as 0.1.0's example writes it.
#[allow(clippy::redundant_closure)]
fn router(
    ws_service: Arc<WebsocketService<ChatMessageHandler>>,
    app_state: Arc<AppState>,
) -> Router {
    let server_state = ServerState {
        app_state,
        ws_service,
    };
    Router::new()
        .route(
            "/ws/{topic}",
            get(
                |ws: WebSocketUpgrade,
                 State(state): State<ServerState>,
                 AxumPath(topic): AxumPath<String>,
                 WsAuth(user): WsAuth<User>| async move {
                    upgrade_handler(
                        ws,
                        State(state.ws_service),
                        user.id,
                        topic,
                        |app_s, u_id, t| validate_topic_access(app_s, u_id, t),
                    )
                    .await
                },
            ),
        )
        .route("/health", get(|| async { "OK" }))
        .with_state(server_state)
}

#[tokio::test]
async fn the_0_1_0_wiring_builds_and_serves() {
    let app_state = Arc::new(AppState {
        secret: "s3cret".into(),
    });
    // 0.1.0 took a Redis URL here; an empty one selects the in-process broker.
    let ws_service = WebsocketService::new("", ChatMessageHandler, Arc::clone(&app_state));
    let app = router(ws_service.clone(), app_state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /ws/room?token=s3cret HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    assert!(ws_service.shard_count() >= 1);
}
