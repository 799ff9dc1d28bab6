//! A chat server: rooms `general` and `random`, plus a private topic per user.
//!
//! ```sh
//! cargo run --release --example basic_chat
//! ```
//!
//! Environment: `BIND_ADDR` (default `127.0.0.1:3000`), `REDIS_URL` (unset: in-process broker,
//! one instance; set: instances share rooms through Redis), `WRITE_DELAY_MS` (default: the
//! builder's `write_delay`, 20 ms), `SHARDS` (default: available parallelism), `RUST_LOG`.
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
//! - `GET /` → a chat page (`examples/static/chat.html`): open <http://127.0.0.1:3000/>.
//! - `POST /broadcast/{topic}` with a JSON body, authorized like `/ws/{topic}` (token: 401; topic:
//!   403/404): the body goes verbatim to every subscriber of the topic on every instance. 202 when
//!   published, 400 when the body is not JSON, 503 when the broker refused it.
//! - SIGTERM or Ctrl-C: every client gets close 1001, then the process exits 0.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum_realtime_kit::prelude::*;
use axum_realtime_kit::prometheus::Prometheus;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Lets mimalloc return freed pages to the OS as soon as they are free, unless
/// `MIMALLOC_PURGE_DELAY` says otherwise.
///
/// By default mimalloc keeps a freed page for a second before returning it, and only does so
/// when the thread that owns it allocates again. After a burst of handshakes (each one holds
/// hyper's buffers until its upgrade) an idle server's threads allocate nothing, so that memory
/// stayed resident: 4.3 to 4.7 KiB of RSS per idle connection at 10 000 instead of 3.8. Purging
/// at once cost nothing measurable in the project's fan-out and connect load tests (PERF.md).
fn return_freed_memory_promptly() {
    // `mi_option_purge_delay` in mimalloc.h (v2 and v3); libmimalloc-sys names no constant for it.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads options atomically.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0)
        };
    }
}

/// Turns transparent huge pages off for this process (Linux), unless `MIMALLOC_ALLOW_THP` says
/// otherwise.
///
/// mimalloc asks the kernel for huge pages for its arena (`MADV_HUGEPAGE`). A huge page is 2 MiB
/// resident however little of it is in use, and the kernel's khugepaged keeps merging the arena's
/// sparsely used regions into huge pages in the background: an idle `basic_chat` held 8 to
/// 10 MiB of anonymous memory instead of 1, and its RSS moved in 2 MiB steps with no client
/// connected (PERF.md, section 18). Fan-out throughput did not change measurably without them.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes one flag of this process;
        // it cannot affect memory safety. A kernel without it returns an error, ignored here.
        #[allow(unsafe_code)]
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0)
        };
    }
}

/// Runs on a worker thread each time it runs out of work: lets mimalloc take back what other
/// threads freed of this thread's allocations, at most once a second per thread.
///
/// A connection's task is allocated on one worker and often freed on another; mimalloc hands
/// such a block back to its own thread's pages only when that thread next allocates or
/// collects, and only then can the page be returned to the OS. A worker that parks after a peak
/// may not allocate again for a long time. Without this, three rounds of 2 000 connections left
/// 4.6 to 9.4 MiB more resident than before them once everyone had gone; with it, at most
/// 1.4 MiB (PERF.md, section 17). A collection walks the thread's whole heap, so its cost grows
/// with the connections: at most every 10 ms, it added 3.7 µs of CPU per delivery with 10 000
/// subscribers and doubled p99 (PERF.md, section 20).
fn collect_when_idle() {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(1);
    thread_local! {
        static LAST: std::cell::Cell<Option<std::time::Instant>> =
            const { std::cell::Cell::new(None) };
    }
    LAST.with(|last| {
        if last.get().is_none_or(|at| at.elapsed() >= EVERY) {
            last.set(Some(std::time::Instant::now()));
            // SAFETY: `mi_collect` only gives back what this thread's heap no longer uses.
            #[allow(unsafe_code)]
            unsafe {
                libmimalloc_sys::mi_collect(false)
            };
        }
    });
}

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

/// Builds the chat service: the in-process broker without `redis_url`.
pub fn chat_service(
    redis_url: Option<String>,
    shards: Option<usize>,
) -> Arc<WebsocketService<ChatHandler>> {
    let mut builder =
        WebsocketService::builder(ChatHandler, Arc::new(AppState)).redis_url(redis_url);
    if let Some(n) = shards {
        builder = builder.shards(n);
    }
    // Tuning knob for the load tests (PERF.md): how long a writer lets frames collect.
    if let Some(ms) = std::env::var("WRITE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
    {
        builder = builder.write_delay(std::time::Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    builder.build()
}

/// The chat routes.
pub fn chat_router(service: Arc<WebsocketService<ChatHandler>>) -> Router {
    let mut router = Router::new()
        .route("/", get(chat_page))
        .route("/ws/{topic}", get(ws_route))
        .route("/broadcast/{topic}", post(broadcast))
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
const CHAT_PAGE: &str = include_str!("static/chat.html");

async fn chat_page() -> Html<&'static str> {
    Html(CHAT_PAGE)
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
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("could not publish: {e}"),
        )
            .into_response(),
    }
}

async fn ready(State(state): State<ServerState>) -> impl IntoResponse {
    if state.service.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable")
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn main() {
    no_transparent_huge_pages();
    return_freed_memory_promptly();
    // What `#[tokio::main]` builds, plus the allocator hook above.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(collect_when_idle)
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

    let service = chat_service(redis_url, shards);
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
            shutdown_signal().await;
            tracing::info!("shutting down: closing every connection with 1001");
            for_shutdown.shutdown().await;
        })
        .await;
    if let Err(e) = served {
        eprintln!("server error: {e}");
        std::process::exit(1);
    }
}
