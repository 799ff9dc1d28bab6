//! Load-test peer: what a Rust developer picks off the shelf for rooms over WebSocket with Redis
//! scale-out: socketioxide with its Redis adapter (`socketioxide-redis`, the redis-rs driver),
//! inside axum. It serves the chat/fan-out contract of the other peers in Socket.IO's idiom:
//!
//! - a client connects to namespace `/` over the WebSocket transport with auth
//!   `{"token":"<uuid>:<name>","topic":"<topic>"}`; topics are `general`, `random` and
//!   `private-user-<own uuid>`, anything else is refused by a connect middleware (a `44` packet);
//! - the socket joins the room named after its topic;
//! - event `send` with `{"room":R,"text":T}` emits `NewMessage` `{"room","username","text"}` to
//!   every socket of room R on every instance, sender included (`within`), through the adapter.
//!   A room other than the socket's topic gets an `error` event to the sender alone.
//!
//! Settings: WebSocket transport only (no long-polling, so no upgrade), everything else at
//! socketioxide's defaults (25 s heartbeat, 128 buffered packets per socket).
//!
//! Environment: `BIND_ADDR` (default `127.0.0.1:3000`), `REDIS_URL` (required; RESP3 is
//! requested, which the adapter's driver needs).

use axum::Router;
use axum::routing::get;
use rtk_peers::User;
use serde::{Deserialize, Serialize};
use socketioxide::SocketIo;
use socketioxide::TransportType;
use socketioxide::adapter::Emitter;
use socketioxide::extract::{Data, SocketRef};
use socketioxide::handler::ConnectHandler;
use socketioxide_redis::{RedisAdapter, RedisAdapterCtr};

type Socket = SocketRef<RedisAdapter<Emitter>>;

/// The connect payload.
#[derive(Debug, Deserialize)]
struct Auth {
    token: String,
    topic: String,
}

/// The `send` event's payload.
#[derive(Debug, Deserialize)]
struct SendMessage {
    room: String,
    text: String,
}

#[derive(Debug, Serialize)]
struct NewMessage<'a> {
    room: &'a str,
    username: &'a str,
    text: &'a str,
}

#[derive(Debug, Serialize)]
struct ErrorEvent {
    message: String,
}

/// Why a connection is refused (sent to the client in the `44` packet).
#[derive(Debug)]
struct Refused(&'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Refused {}

fn authorize(auth: &Auth) -> Result<User, Refused> {
    let user = rtk_peers::parse_token(&auth.token).map_err(|_| Refused("unauthorized"))?;
    rtk_peers::check_topic(&user, &auth.topic).map_err(|_| Refused("forbidden topic"))?;
    Ok(user)
}

async fn check_auth(Data(auth): Data<Auth>) -> Result<(), Refused> {
    authorize(&auth).map(|_| ())
}

async fn on_connect(socket: Socket, Data(auth): Data<Auth>) {
    // The middleware has accepted this payload already.
    let Ok(user) = authorize(&auth) else {
        let _ = socket.disconnect();
        return;
    };
    let topic = auth.topic;
    socket.join(topic.clone());
    socket.on(
        "send",
        async move |socket: Socket, Data(msg): Data<SendMessage>| {
            if msg.room != topic {
                let message = rtk_peers::wrong_room_message(&msg.room, &topic);
                let _ = socket.emit("error", &ErrorEvent { message });
                return;
            }
            let event = NewMessage {
                room: &topic,
                username: &user.name,
                text: &msg.text,
            };
            if let Err(e) = socket
                .within(topic.clone())
                .emit("NewMessage", &event)
                .await
            {
                let _ = socket.emit(
                    "error",
                    &ErrorEvent {
                        message: format!("broadcast failed: {e}"),
                    },
                );
            }
        },
    );
}

#[tokio::main]
async fn main() {
    let addr = rtk_peers::bind_addr();
    let mut redis_url = rtk_peers::redis_url("peer_socketioxide");
    if !redis_url.contains("protocol=") {
        redis_url.push_str(if redis_url.contains('?') {
            "&protocol=resp3"
        } else {
            "?protocol=resp3"
        });
    }
    let client = redis::Client::open(redis_url.as_str()).unwrap_or_else(|e| {
        eprintln!("peer_socketioxide: bad REDIS_URL {redis_url:?}: {e}");
        std::process::exit(2);
    });
    let adapter = RedisAdapterCtr::new_with_redis(&client)
        .await
        .unwrap_or_else(|e| {
            eprintln!("peer_socketioxide: cannot connect to Redis: {e}");
            std::process::exit(1);
        });
    let (layer, io) = SocketIo::builder()
        .transports([TransportType::Websocket])
        .with_adapter::<RedisAdapter<_>>(adapter)
        .build_layer();
    if let Err(e) = io.ns("/", on_connect.with(check_auth)).await {
        eprintln!("peer_socketioxide: cannot set up namespace: {e}");
        std::process::exit(1);
    }

    let app = Router::new()
        .route("/health", get(|| async { "OK" }))
        .layer(layer);
    let listener = rtk_peers::listen("peer_socketioxide", addr);
    eprintln!("peer_socketioxide listening on {addr}");
    tokio::select! {
        served = axum::serve(listener, app) => {
            if let Err(e) = served {
                eprintln!("peer_socketioxide: server error: {e}");
                std::process::exit(1);
            }
        }
        () = axum_realtime_kit::shutdown_signal() => {}
    }
    std::process::exit(0);
}
