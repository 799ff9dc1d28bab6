//! Load-test peer: what a Rust developer writes by hand without our crate. axum 0.8's built-in
//! WebSocket, one `tokio::sync::broadcast` channel per topic, one redis-rs subscriber connection
//! feeding them and one shared multiplexed connection for publishing. Serves the `basic_chat`
//! example's protocol (its module docs).
//!
//! Environment: `BIND_ADDR` (default `127.0.0.1:3000`), `REDIS_URL` (required).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use redis::AsyncCommands;
use redis::aio::{MultiplexedConnection, PubSubSink};
use rtk_peers::{ClientMessage, User};
use tokio::sync::{broadcast, mpsc};

/// Capacity of each topic's broadcast channel.
const TOPIC_CAPACITY: usize = 1024;

struct AppState {
    /// Live topics on this instance.
    topics: Mutex<HashMap<String, broadcast::Sender<Utf8Bytes>>>,
    /// Topics the Redis subscriber connection has subscribed to (never unsubscribed).
    subscribed: tokio::sync::Mutex<HashSet<String>>,
    subscriber: PubSubSink,
    publisher: MultiplexedConnection,
}

impl AppState {
    /// Makes sure Redis delivers `topic` to us before the client is upgraded.
    async fn ensure_subscribed(&self, topic: &str) -> redis::RedisResult<()> {
        let mut subscribed = self.subscribed.lock().await;
        if !subscribed.contains(topic) {
            self.subscriber.clone().subscribe(topic).await?;
            subscribed.insert(topic.to_owned());
        }
        Ok(())
    }

    fn join(&self, topic: &str) -> broadcast::Receiver<Utf8Bytes> {
        let mut topics = self.topics.lock().unwrap();
        match topics.get(topic) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(TOPIC_CAPACITY);
                topics.insert(topic.to_owned(), tx);
                rx
            }
        }
    }

    /// Drops the topic's channel once its last receiver is gone.
    fn leave(&self, topic: &str) {
        let mut topics = self.topics.lock().unwrap();
        if topics.get(topic).is_some_and(|tx| tx.receiver_count() == 0) {
            topics.remove(topic);
        }
    }

    fn dispatch(&self, msg: &redis::Msg) {
        let Ok(payload) = std::str::from_utf8(msg.get_payload_bytes()) else {
            return;
        };
        let tx = self
            .topics
            .lock()
            .unwrap()
            .get(msg.get_channel_name())
            .cloned();
        if let Some(tx) = tx {
            let _ = tx.send(Utf8Bytes::from(payload));
        }
    }
}

fn token(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_owned)
        .or_else(|| query.get("token").cloned())
}

async fn ws_route(
    ws: WebSocketUpgrade,
    State(state): State<Arc<AppState>>,
    Path(topic): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(user) = token(&headers, &query).and_then(|t| rtk_peers::parse_token(&t).ok()) else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    if let Err(denied) = rtk_peers::check_topic(&user, &topic) {
        return StatusCode::from_u16(denied.status())
            .unwrap_or(StatusCode::NOT_FOUND)
            .into_response();
    }
    if let Err(e) = state.ensure_subscribed(&topic).await {
        eprintln!("peer_axum: cannot subscribe to {topic}: {e}");
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    ws.on_upgrade(move |socket| client(socket, state, topic, user))
}

async fn client(socket: WebSocket, state: Arc<AppState>, topic: String, user: User) {
    let mut room_rx = state.join(&topic);
    let (mut sink, mut stream) = socket.split();
    let (direct_tx, mut direct_rx) = mpsc::channel::<Utf8Bytes>(64);

    // Writer: room messages and direct replies to the socket.
    let writer = tokio::spawn(async move {
        loop {
            let text = tokio::select! {
                r = room_rx.recv() => match r {
                    Ok(text) => text,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                d = direct_rx.recv() => match d {
                    Some(text) => text,
                    None => break,
                },
            };
            if sink.send(Message::Text(text)).await.is_err() {
                break;
            }
        }
    });

    // Reader: client messages.
    while let Some(Ok(msg)) = stream.next().await {
        let text = match msg {
            Message::Text(text) => text,
            // The stream ends after tungstenite has answered the Close.
            _ => continue,
        };
        let reply = match serde_json::from_str::<ClientMessage>(&text) {
            Ok(ClientMessage::Ping) => Some(rtk_peers::PONG_JSON.to_owned()),
            Ok(ClientMessage::SendMessage { room, .. }) if room != topic => Some(
                rtk_peers::error_json(&rtk_peers::wrong_room_message(&room, &topic)),
            ),
            Ok(ClientMessage::SendMessage { room, text }) => {
                let json = rtk_peers::new_message_json(&room, &user.name, &text);
                let mut conn = state.publisher.clone();
                match conn.publish::<_, _, i64>(&room, json).await {
                    Ok(_) => None,
                    Err(e) => Some(rtk_peers::error_json(&format!("publish failed: {e}"))),
                }
            }
            Err(e) => Some(rtk_peers::error_json(&format!(
                "Invalid message format: {e}"
            ))),
        };
        if let Some(reply) = reply
            && direct_tx.send(reply.into()).await.is_err()
        {
            break;
        }
    }

    writer.abort();
    let _ = writer.await;
    state.leave(&topic);
}

#[tokio::main]
async fn main() {
    let addr = rtk_peers::bind_addr();
    let redis_url = rtk_peers::redis_url("peer_axum");

    let client = redis::Client::open(redis_url.as_str()).unwrap_or_else(|e| {
        eprintln!("peer_axum: bad REDIS_URL {redis_url:?}: {e}");
        std::process::exit(2);
    });
    let publisher = client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| {
            eprintln!("peer_axum: cannot connect to Redis: {e}");
            std::process::exit(1);
        });
    let pubsub = client.get_async_pubsub().await.unwrap_or_else(|e| {
        eprintln!("peer_axum: cannot connect to Redis: {e}");
        std::process::exit(1);
    });
    let (subscriber, mut messages) = pubsub.split();

    let state = Arc::new(AppState {
        topics: Mutex::new(HashMap::new()),
        subscribed: tokio::sync::Mutex::new(HashSet::new()),
        subscriber,
        publisher,
    });

    let dispatch_state = Arc::clone(&state);
    tokio::spawn(async move {
        while let Some(msg) = messages.next().await {
            dispatch_state.dispatch(&msg);
        }
        eprintln!("peer_axum: Redis subscriber connection closed");
        std::process::exit(1);
    });

    let app = Router::new()
        .route("/ws/{topic}", get(ws_route))
        .route("/health", get(|| async { "OK" }))
        .with_state(state);

    let listener = rtk_peers::listen("peer_axum", addr);
    eprintln!("peer_axum listening on {addr}");
    tokio::select! {
        served = axum::serve(listener, app) => {
            if let Err(e) = served {
                eprintln!("peer_axum: server error: {e}");
                std::process::exit(1);
            }
        }
        () = axum_realtime_kit::shutdown_signal() => {}
    }
    std::process::exit(0);
}
