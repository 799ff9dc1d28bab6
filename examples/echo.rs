//! An echo server on the runtime, for protocol conformance runs (Autobahn's fuzzing client):
//! every text and binary message comes back to its sender, unchanged.
//!
//! ```sh
//! BIND_ADDR=127.0.0.1:9001 cargo run --release --example echo
//! ```
//!
//! WebSocket endpoint: `ws://<BIND_ADDR>/` (no authentication). Limits are raised to what the
//! conformance cases send (messages up to 16 MiB, no rate limit).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use axum_realtime_kit::prelude::*;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Echoes every message to its sender through the connection's sink.
#[derive(Debug)]
struct Echo;

#[async_trait]
impl MessageHandler for Echo {
    type ClientMessage = String;
    type ServerEvent = ();
    type AppState = ();
    type UserId = ();

    // Any text is a message, not just JSON.
    fn decode(&self, text: &mut [u8]) -> Result<String, String> {
        String::from_utf8(text.to_vec()).map_err(|e| e.to_string())
    }

    async fn handle_broadcast_message(
        &self,
        msg: String,
        ctx: &ConnectionContext<(), ()>,
    ) -> Result<Option<()>, HandlerError> {
        let _ = ctx.sink.send_text(msg);
        Ok(None)
    }

    async fn handle_binary_message(
        &self,
        data: &[u8],
        ctx: &ConnectionContext<(), ()>,
    ) -> Result<(), HandlerError> {
        let _ = ctx.sink.send_binary(data);
        Ok(())
    }
}

type Service = Arc<WebsocketService<Echo>>;

async fn ws(upgrade: WebSocketUpgrade, State(service): State<Service>) -> axum::response::Response {
    upgrade_handler(
        upgrade,
        State(service),
        (),
        "echo".into(),
        |_, _, _| async { Ok(()) },
    )
    .await
}

#[tokio::main]
async fn main() {
    let addr: SocketAddr = std::env::var("BIND_ADDR")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9001)));
    let service = WebsocketService::builder(Echo, Arc::new(()))
        .max_message_size(20 * 1024 * 1024)
        .outbound_queue_bytes(64 * 1024 * 1024)
        .rate_limit(None)
        .close_timeout(Duration::from_secs(1))
        // An echo answers each message at once: the conformance cases wait for every reply.
        .write_delay(Duration::ZERO)
        .permessage_deflate(true)
        // The conformance run's echo compresses every message, short ones included.
        .permessage_deflate_min_size(0)
        .build();
    let app = Router::new()
        .route("/", get(ws))
        .with_state(service.clone());
    let listener = match axum_realtime_kit::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot bind {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("echo listening on ws://{addr}/");
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            service.shutdown().await;
        })
        .await;
}
