//! A chat server: rooms `general` and `random`, plus a private topic per user.
//!
//! ```sh
//! cargo run --release --example basic_chat
//! ```
//!
//! Environment: `BIND_ADDR` (default `127.0.0.1:3000`), `REDIS_URL` (unset: in-process broker,
//! one instance; set: instances share rooms through Redis), `WRITE_DELAY_MS` (default: the
//! builder's `write_delay`, 20 ms), `SHARDS` (default: available parallelism), `RUST_LOG`,
//! `REDIS_CA_FILE` (a `rediss://` Redis whose certificate a private CA in this PEM file signed).
//!
//! Protocol:
//! - `GET /ws/{topic}?token=<uuid>:<name>` (or `Authorization: Bearer <uuid>:<name>`): 401 without
//!   a valid token; topics `general`, `random` and `private-user-<own uuid>`; someone else's private
//!   topic is 403, anything else 404.
//! - `{"SendMessage":{"room":R,"text":T}}` → every subscriber of `R` receives
//!   `{"NewMessage":{"room":R,"username":<name>,"text":T}}`; `R` must be the connection's topic.
//! - `"Ping"` → `"Pong"` to the sender alone. Errors: `{"type":"error","message":…}`.
//! - `GET /health` → `OK`; `GET /ready` → 200 while the broker is live, else 503.
//! - `GET /metrics` → the runtime's counters and gauges in Prometheus' text format.
//! - `GET /` → a chat page (`examples/static/chat.html`, built on the kit's JavaScript client,
//!   served at `/client.js`): open <http://127.0.0.1:3000/>. It reconnects by itself;
//!   `/?servers=ws://a/ws,ws://b/ws` gives it several instances to try in turn.
//! - `POST /broadcast/{topic}` with a JSON body, authorized like `/ws/{topic}` (token: 401; topic:
//!   403/404): the body goes verbatim to every subscriber of the topic on every instance. 202 when
//!   published, 400 when the body is not JSON, 503 when the broker refused it.
//! - SIGTERM or Ctrl-C: every client gets close 1001, then the process exits 0.
//! - `rtk1` (opt-in, `?proto=rtk1` or the `rtk1` WebSocket subprotocol): every frame is a JSON
//!   envelope (`subscribed`, `pub`, `insufficient_state`, `error`); the rooms `general` and
//!   `random` keep their last 1 000 messages for 10 minutes (on one instance or through Redis), so
//!   `GET /ws/general?token=…&proto=rtk1&since=<offset>&epoch=<epoch>` receives every message
//!   after that position, then live ones; `{"type":"subscribe","topic":T}` joins another topic
//!   the user may open. Clients without `proto=rtk1` see exactly the frames above.
//! - Presence in `general` and `random`: `rtk1` clients get `{"type":"join"|"leave",…}` when a
//!   user's first connection arrives or last one leaves, and `{"type":"presence","topic":T}`
//!   answers who is there. `GET /presence/{topic}[?cursor=…]`, authorized like `/ws/{topic}`,
//!   returns `{"users":[{"user","connections","info"}…],"next":…,"stats":{"users","connections"}}`
//!   (404 for a private topic: it has no presence).
//!   `PRESENCE_TTL_MS` (default 60 000): how soon a crashed instance's users leave.
//!
//! `alloc.rs` sets up the allocator (mimalloc, tuned for a small idle footprint); the chat does
//! not depend on it.

mod alloc;

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum_realtime_kit::prelude::*;
use axum_realtime_kit::prometheus::Prometheus;
use axum_realtime_kit::{BuildError, PresenceError, TopicPolicy};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The user a token names: `<uuid>:<name>`.
#[derive(Debug, Clone)]
pub struct User {
    /// Stable id; the private topic is `private-user-<id>`.
    pub id: Uuid,
    /// Display name, shown as `username` in messages.
    pub name: String,
}

/// What clients send.
#[derive(Debug, Deserialize)]
pub enum ClientMessage {
    /// Post `text` to `room` (the connection's topic).
    SendMessage {
        /// Target room; must equal the connection's topic.
        room: String,
        /// Message text.
        text: String,
    },
    /// Answered with `"Pong"` to the sender alone.
    Ping,
}

/// What the server sends.
#[derive(Debug, Serialize)]
pub enum ServerEvent {
    /// A chat message, broadcast to the room.
    NewMessage {
        /// The room it was posted to.
        room: String,
        /// The sender's name.
        username: String,
        /// The text.
        text: String,
    },
    /// The answer to `Ping`.
    Pong,
}

/// Application state: token checks. A real application would keep its database pool here.
#[derive(Debug, Clone, Default)]
pub struct AppState;

/// Why a token was refused.
#[derive(Debug)]
pub struct AuthError(&'static str);

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for AuthError {}

/// Accepts any `<uuid>:<name>`: for demonstration only, since nothing signs it and anyone can
/// forge it; see the auth guide (`docs/guides/auth.md`) for a real validator.
#[async_trait]
impl TokenValidator for AppState {
    type User = User;
    type Error = AuthError;

    async fn validate_token(&self, token: &str) -> Result<User, AuthError> {
        let (id, name) = token
            .split_once(':')
            .ok_or(AuthError("token must be <uuid>:<name>"))?;
        let id = Uuid::parse_str(id).map_err(|_| AuthError("token id is not a UUID"))?;
        if name.is_empty() {
            return Err(AuthError("token has an empty name"));
        }
        Ok(User {
            id,
            name: name.to_owned(),
        })
    }
}

/// The chat logic.
#[derive(Debug)]
pub struct ChatHandler;

#[async_trait]
impl MessageHandler for ChatHandler {
    type ClientMessage = ClientMessage;
    type ServerEvent = ServerEvent;
    type AppState = AppState;
    type UserId = User;

    async fn handle_direct_message(
        &self,
        msg: &ClientMessage,
        _ctx: &ConnectionContext<AppState, User>,
    ) -> Result<Option<serde_json::Value>, HandlerError> {
        match msg {
            ClientMessage::Ping => Ok(Some(serde_json::to_value(ServerEvent::Pong)?)),
            ClientMessage::SendMessage { .. } => Ok(None),
        }
    }

    async fn handle_broadcast_message(
        &self,
        msg: ClientMessage,
        ctx: &ConnectionContext<AppState, User>,
    ) -> Result<Option<ServerEvent>, HandlerError> {
        match msg {
            ClientMessage::SendMessage { room, text } => {
                if room != ctx.topic {
                    return Err(HandlerError::Custom(
                        StatusCode::BAD_REQUEST,
                        Some(format!(
                            "Cannot send to room '{room}' from topic '{}'",
                            ctx.topic
                        )),
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

/// Who may open which topic.
async fn validate_topic(
    _state: Arc<AppState>,
    user: User,
    topic: String,
) -> Result<(), StatusCode> {
    if topic == "general" || topic == "random" {
        return Ok(());
    }
    if let Some(owner) = topic.strip_prefix("private-user-") {
        return if owner == user.id.to_string() {
            Ok(())
        } else {
            Err(StatusCode::FORBIDDEN)
        };
    }
    Err(StatusCode::NOT_FOUND)
}

/// The router's state: the token check and the service.
#[derive(Debug, Clone)]
pub struct ServerState {
    app_state: Arc<AppState>,
    service: Arc<WebsocketService<ChatHandler>>,
}

#[async_trait]
impl TokenValidator for ServerState {
    type User = User;
    type Error = AuthError;

    async fn validate_token(&self, token: &str) -> Result<User, AuthError> {
        self.app_state.validate_token(token).await
    }
}

/// Builds the chat service: the in-process broker without `redis_url`. An unusable URL is an
/// error to report, not a panic.
pub fn chat_service(
    redis_url: Option<String>,
    shards: Option<usize>,
) -> Result<Arc<WebsocketService<ChatHandler>>, BuildError> {
    let mut builder = WebsocketService::builder(ChatHandler, Arc::new(AppState))
        .redis_url(redis_url)
        // `rtk1` clients may join more topics with a subscribe command: the same rule.
        .authorize_topics(validate_topic)
        // The rooms keep their last 1 000 messages for 10 minutes: an `rtk1` client that
        // reconnects with its position, to this instance or another, gets what it missed.
        // And they track who is in them.
        .topic_policy(|topic| {
            matches!(topic, "general" | "random").then(|| {
                TopicPolicy::history(1_000, std::time::Duration::from_secs(600)).presence(true)
            })
        })
        // In presence, a user is their id, shown with their name.
        .presence_user(|user: &User| {
            (
                user.id.to_string(),
                serde_json::json!({ "name": user.name }),
            )
        })
        // Browsers offer permessage-deflate: each publication is compressed once and shared.
        .permessage_deflate(true);
    if let Some(n) = shards {
        builder = builder.shards(n);
    }
    // How soon the users of an instance that crashed leave (renewed every third of it).
    if let Some(ms) = std::env::var("PRESENCE_TTL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let ttl = std::time::Duration::from_millis(ms);
        builder = builder.presence_timing(ttl / 3, ttl);
    }
    if let Some(ca) = std::env::var_os("REDIS_CA_FILE").filter(|v| !v.is_empty()) {
        builder = builder.redis_tls(axum_realtime_kit::RedisTls::new().ca_file(ca));
    }
    // Tuning knob for the load tests (PERF.md): how long a writer lets frames collect.
    if let Some(ms) = std::env::var("WRITE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        builder = builder.write_delay(std::time::Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    builder.try_build()
}

/// The chat routes.
pub fn chat_router(service: Arc<WebsocketService<ChatHandler>>) -> Router {
    let mut router = Router::new()
        .route("/", get(chat_page))
        .route("/client.js", get(client_js))
        .route("/ws/{topic}", get(ws_route))
        .route("/broadcast/{topic}", post(broadcast))
        .route("/presence/{topic}", get(presence))
        .route("/health", get(|| async { "OK" }))
        .route("/ready", get(ready));
    // Prometheus scrapes `/metrics` (the `rtk_*` series; see the crate docs' "Metrics").
    match Prometheus::install() {
        Ok(prometheus) => router = router.route("/metrics", prometheus.handler(service.clone())),
        Err(e) => tracing::warn!(error = %e, "no /metrics route"),
    }
    let state = ServerState {
        app_state: service.app_state().clone(),
        service,
    };
    router.with_state(state)
}

async fn ws_route(
    ws: WebSocketUpgrade,
    State(state): State<ServerState>,
    Path(topic): Path<String>,
    WsAuth(user): WsAuth<User>,
) -> Response {
    upgrade_handler(ws, State(state.service), user, topic, validate_topic).await
}

/// The browser client: plain HTML and JavaScript, compiled into the binary.
const CHAT_PAGE: &str = include_str!("../static/chat.html");

async fn chat_page() -> Html<&'static str> {
    Html(CHAT_PAGE)
}

/// The kit's JavaScript client (clients/js), which the page is built on.
const CLIENT_JS: &str = include_str!("../../clients/js/index.js");

async fn client_js() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/javascript; charset=utf-8",
        )],
        CLIENT_JS,
    )
}

/// Publishes the request body, verbatim, to every subscriber of `topic` on every instance.
/// The token and topic are checked exactly as for `/ws/{topic}`.
async fn broadcast(
    State(state): State<ServerState>,
    WsAuth(user): WsAuth<User>,
    Path(topic): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(status) = validate_topic(state.app_state.clone(), user, topic.clone()).await {
        return status.into_response();
    }
    let is_json = std::str::from_utf8(&body)
        .is_ok_and(|text| serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok());
    if !is_json {
        return (StatusCode::BAD_REQUEST, "the body must be UTF-8 JSON").into_response();
    }
    match state.service.publish_raw(&topic, body).await {
        Ok(_) => StatusCode::ACCEPTED.into_response(),
        Err(e) => {
            // The detail (the broker's address…) goes to the log, not to the client.
            tracing::warn!(error = %e, %topic, "publish failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "could not publish: broker unavailable",
            )
                .into_response()
        }
    }
}

/// Who is in `topic`, on every instance: a page of users and the counts. The token and topic
/// are checked exactly as for `/ws/{topic}`; a topic without presence is 404.
async fn presence(
    State(state): State<ServerState>,
    WsAuth(user): WsAuth<User>,
    Path(topic): Path<String>,
    Query(page): Query<PresencePageQuery>,
) -> Response {
    if let Err(status) = validate_topic(state.app_state.clone(), user, topic.clone()).await {
        return status.into_response();
    }
    let service = &state.service;
    let listed = service.presence(&topic, page.cursor.as_deref(), 100).await;
    match (listed, service.presence_stats(&topic).await) {
        (Ok(page), Ok(stats)) => {
            let body =
                serde_json::json!({ "users": page.users, "next": page.next, "stats": stats });
            axum::Json(body).into_response()
        }
        (Err(PresenceError::NotEnabled), _) | (_, Err(PresenceError::NotEnabled)) => {
            (StatusCode::NOT_FOUND, "no presence for this topic").into_response()
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, %topic, "presence failed");
            (StatusCode::SERVICE_UNAVAILABLE, "presence unavailable").into_response()
        }
    }
}

/// `GET /presence/{topic}?cursor=…`: where the page starts (the previous page's `next`).
#[derive(Debug, Deserialize)]
pub struct PresencePageQuery {
    cursor: Option<String>,
}

async fn ready(State(state): State<ServerState>) -> impl IntoResponse {
    if state.service.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable")
    }
}

fn main() {
    alloc::tune();
    // What `#[tokio::main]` builds, plus the allocator's idle hook.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(alloc::collect_when_idle)
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(serve()),
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            std::process::exit(1);
        }
    }
}

async fn serve() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "basic_chat=info,axum_realtime_kit=info".into()),
        )
        .init();

    let addr: SocketAddr = match std::env::var("BIND_ADDR") {
        Ok(a) => a.parse().unwrap_or_else(|e| {
            eprintln!("BIND_ADDR={a:?} is not an address: {e}");
            std::process::exit(2);
        }),
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 3000)),
    };
    let shards = match std::env::var("SHARDS") {
        Ok(s) => match s.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                eprintln!("SHARDS={s:?} must be a positive integer");
                std::process::exit(2);
            }
        },
        Err(_) => None,
    };
    let redis_url = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty());
    if redis_url.is_none() {
        tracing::info!("REDIS_URL not set: using the in-process broker (single instance)");
    }

    let service = chat_service(redis_url, shards).unwrap_or_else(|e| {
        eprintln!("REDIS_URL: {e}");
        std::process::exit(2);
    });
    let listener = match axum_realtime_kit::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    tracing::info!(%addr, shards = service.shard_count(), "basic_chat listening");

    let for_shutdown = service.clone();
    let served = axum::serve(listener, chat_router(service))
        .with_graceful_shutdown(async move {
            axum_realtime_kit::shutdown_signal().await;
            tracing::info!("shutting down: closing every connection with 1001");
            for_shutdown.shutdown().await;
        })
        .await;
    if let Err(e) = served {
        eprintln!("server error: {e}");
        std::process::exit(1);
    }
}
