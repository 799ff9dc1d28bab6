//! What the load-test peers share: environment, tokens, topic rules and the message shapes
//! of the `basic_chat` example's protocol (its module docs; summarized in docs/architecture.md,
//! "The example's contract").
//!
//! The peers are `peer_reference` (the published `axum-realtime-kit` 0.1.0), `peer_axum`
//! (hand-written axum + redis-rs), `peer_socketioxide` (socketioxide with its Redis adapter, the
//! contract in Socket.IO's idiom) and `peer_limit` (raw tokio, the machine's ceiling); Socket.IO
//! on Node is in `socketio/`. Each one reads `BIND_ADDR` (default `127.0.0.1:3000`) and requires
//! `REDIS_URL`.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The address to listen on: `BIND_ADDR`, default `127.0.0.1:3000`. Exits with status 2 when it
/// does not parse.
pub fn bind_addr() -> SocketAddr {
    match std::env::var("BIND_ADDR") {
        Ok(a) => a.parse().unwrap_or_else(|e| {
            eprintln!("BIND_ADDR={a:?} is not a socket address: {e}");
            std::process::exit(2);
        }),
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 3000)),
    }
}

/// A listener on `addr` from `axum_realtime_kit::bind`, as `basic_chat` has:
/// `tokio::net::TcpListener::bind` asks for a queue of 128, and a burst of handshakes that
/// overflows it costs the dropped clients a 1 s SYN retry, so the connect test would measure the
/// queue length instead of the server. Exits with status 1 when it cannot bind.
pub fn listen(program: &str, addr: SocketAddr) -> tokio::net::TcpListener {
    axum_realtime_kit::bind(addr).unwrap_or_else(|e| {
        eprintln!("{program}: cannot bind {addr}: {e}");
        std::process::exit(1);
    })
}

/// `REDIS_URL`, which every peer requires. Exits with status 2 when it is unset or empty.
pub fn redis_url(program: &str) -> String {
    match std::env::var("REDIS_URL") {
        Ok(u) if !u.is_empty() => u,
        _ => {
            eprintln!(
                "{program}: REDIS_URL is not set; this peer needs Redis (e.g. REDIS_URL=redis://127.0.0.1:6379/)"
            );
            std::process::exit(2);
        }
    }
}

/// The user a token names: `<uuid>:<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Stable id; the user's private topic is `private-user-<id>`.
    pub id: Uuid,
    /// Display name, sent as `username` in `NewMessage`.
    pub name: String,
}

/// A token that is not `<uuid>:<non-empty name>`.
#[derive(Debug, Clone, Copy)]
pub struct BadToken;

impl fmt::Display for BadToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("token must be <uuid>:<name>")
    }
}

impl std::error::Error for BadToken {}

/// Parses a `<uuid>:<name>` token.
pub fn parse_token(token: &str) -> Result<User, BadToken> {
    let (id, name) = token.split_once(':').ok_or(BadToken)?;
    let id = Uuid::parse_str(id).map_err(|_| BadToken)?;
    if name.is_empty() {
        return Err(BadToken);
    }
    Ok(User {
        id,
        name: name.to_owned(),
    })
}

/// Why a user may not open a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicDenied {
    /// Someone else's private topic: 403.
    Forbidden,
    /// Not a topic of this server: 404.
    NotFound,
}

impl TopicDenied {
    /// The HTTP status code of the refusal.
    pub fn status(self) -> u16 {
        match self {
            Self::Forbidden => 403,
            Self::NotFound => 404,
        }
    }
}

/// Who may open which topic: `general`, `random` and `private-user-<own uuid>`.
pub fn check_topic(user: &User, topic: &str) -> Result<(), TopicDenied> {
    if topic == "general" || topic == "random" {
        return Ok(());
    }
    match topic.strip_prefix("private-user-") {
        Some(owner) if owner == user.id.to_string() => Ok(()),
        Some(_) => Err(TopicDenied::Forbidden),
        None => Err(TopicDenied::NotFound),
    }
}

/// What clients send.
#[derive(Debug, Clone, Deserialize)]
pub enum ClientMessage {
    /// Post `text` to `room`, which must be the connection's topic.
    SendMessage {
        /// Target room.
        room: String,
        /// Message text.
        text: String,
    },
    /// Answered with `"Pong"` to the sender alone.
    Ping,
}

/// What the server sends (besides error objects).
#[derive(Debug, Clone, Serialize)]
pub enum ServerEvent {
    /// A chat message, published to the room's Redis channel.
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

/// The JSON text of `"Pong"`.
pub const PONG_JSON: &str = "\"Pong\"";

/// The JSON published for a chat message.
pub fn new_message_json(room: &str, username: &str, text: &str) -> String {
    #[derive(Serialize)]
    enum Event<'a> {
        NewMessage {
            room: &'a str,
            username: &'a str,
            text: &'a str,
        },
    }
    serde_json::to_string(&Event::NewMessage {
        room,
        username,
        text,
    })
    .expect("strings always serialize")
}

/// The error object sent to one client: `{"type":"error","message":…}`.
pub fn error_json(message: &str) -> String {
    serde_json::json!({ "type": "error", "message": message }).to_string()
}

/// The error for a `SendMessage` whose room is not the connection's topic.
pub fn wrong_room_message(room: &str, topic: &str) -> String {
    format!("Cannot send to room '{room}' from topic '{topic}'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_topics() {
        let id = Uuid::new_v4();
        let user = parse_token(&format!("{id}:alice")).unwrap();
        assert_eq!(user.name, "alice");
        assert!(parse_token("nope:alice").is_err());
        assert!(parse_token(&format!("{id}:")).is_err());
        assert_eq!(check_topic(&user, "general"), Ok(()));
        assert_eq!(check_topic(&user, &format!("private-user-{id}")), Ok(()));
        assert_eq!(
            check_topic(&user, &format!("private-user-{}", Uuid::new_v4())),
            Err(TopicDenied::Forbidden)
        );
        assert_eq!(check_topic(&user, "other"), Err(TopicDenied::NotFound));
    }

    #[test]
    fn json_shapes() {
        assert_eq!(
            new_message_json("general", "bob", "hi \"x\""),
            r#"{"NewMessage":{"room":"general","username":"bob","text":"hi \"x\""}}"#
        );
        assert_eq!(
            serde_json::to_string(&ServerEvent::Pong).unwrap(),
            PONG_JSON
        );
        let m: ClientMessage = serde_json::from_str("\"Ping\"").unwrap();
        assert!(matches!(m, ClientMessage::Ping));
    }
}
