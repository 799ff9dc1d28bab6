//! [`WsSink`]: the handle a handler uses to send to one connection.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;

use crate::frame;
use crate::outbound::{Conn, NO_TOPIC, Push};
use crate::presence::Identity;
use crate::runtime::{Hub, JoinOutcome};

/// A cheap, cloneable handle that queues frames for one connection.
///
/// It replaces 0.1.0's `Arc<Mutex<SplitSink<…>>>`: nothing here locks a socket or awaits. A send
/// encodes the frame and pushes it onto the connection's bounded outbound queue; the connection's
/// writer sends it, in order with everything else queued for that client.
#[derive(Clone)]
pub struct WsSink {
    conn: Arc<Conn>,
    hub: Arc<Hub>,
    /// Who the connection is for presence, when a topic may track it.
    who: Option<Arc<Identity>>,
}

/// Why a frame could not be queued.
#[derive(Debug)]
#[non_exhaustive]
pub enum SendError {
    /// The connection is closing or closed.
    Closed,
    /// The connection's outbound queue was full; the slow-consumer policy closed it.
    QueueFull,
    /// The value could not be serialized to JSON.
    Serialize(serde_json::Error),
    /// The topic name is not allowed (the same rule as for `/ws/{topic}`: 1 to `max_topic_len`
    /// bytes of printable ASCII without space, `"`, `\`, `*`, `?`, `[` or `]`, not starting
    /// with `__rtk`, which the kit reserves for its own channels).
    InvalidTopic(&'static str),
    /// The connection is already in as many topics as
    /// [`max_topics_per_connection`](crate::ws::service::WebsocketServiceBuilder::max_topics_per_connection)
    /// allows (the one it opened with included); leave one first.
    TooManyTopics,
    /// The broker refused to subscribe the topic, with its reason (a Redis ACL that forbids the
    /// channel: `NOPERM …`). Nothing was joined; the connection stays open.
    TopicRefused(String),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("connection is closed"),
            Self::QueueFull => f.write_str("outbound queue full (slow consumer)"),
            Self::Serialize(e) => write!(f, "serialization failed: {e}"),
            Self::InvalidTopic(why) => f.write_str(why),
            Self::TooManyTopics => f.write_str("connection is in too many topics"),
            Self::TopicRefused(why) => write!(f, "the broker refused the topic: {why}"),
        }
    }
}

impl std::error::Error for SendError {}

impl fmt::Debug for WsSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsSink")
            .field("conn_id", &self.conn.id)
            .finish()
    }
}

impl WsSink {
    pub(crate) fn new(conn: Arc<Conn>, hub: Arc<Hub>) -> Self {
        Self {
            conn,
            hub,
            who: None,
        }
    }

    /// The sink of a connection that counts as `who` in presence topics.
    pub(crate) fn with_identity(mut self, who: Option<Arc<Identity>>) -> Self {
        self.who = who;
        self
    }

    /// Who the connection is for presence.
    pub(crate) fn identity(&self) -> Option<&Identity> {
        self.who.as_deref()
    }

    /// Subscribes this connection to one more topic; resolves once the topic's messages reach
    /// it (with Redis: once Redis confirmed the subscription, or after 2 s if Redis is down).
    ///
    /// The runtime does not authorize topics: check the user's access (as your upgrade
    /// validator does) before calling it. It does check the name, as for `/ws/{topic}`
    /// ([`SendError::InvalidTopic`]), and how many topics the connection is in
    /// ([`SendError::TooManyTopics`]; the limit is exact however many joins and leaves run at
    /// once). Joining a topic twice is a no-op. A topic the broker refuses (a Redis ACL) is
    /// [`SendError::TopicRefused`].
    pub async fn join(&self, topic: &str) -> Result<(), SendError> {
        crate::topic::check(topic, self.hub.max_topic_len).map_err(SendError::InvalidTopic)?;
        if self.conn.is_ending() {
            return Err(SendError::Closed);
        }
        match self.hub.join(&self.conn, topic, self.who.as_deref()).await {
            JoinOutcome::Subscribed => Ok(()),
            JoinOutcome::TooManyTopics => Err(SendError::TooManyTopics),
            JoinOutcome::Refused(why) => Err(SendError::TopicRefused(why)),
            JoinOutcome::Gone => Err(SendError::Closed),
        }
    }

    /// Unsubscribes this connection from `topic` (the one it opened with included).
    pub async fn leave(&self, topic: &str) {
        self.hub.leave(&self.conn, topic).await;
    }

    /// Queues a text frame.
    pub fn send_text(&self, text: impl AsRef<str>) -> Result<(), SendError> {
        self.send_frame(self.encode(frame::OpCode::Text, text.as_ref().as_bytes()))
    }

    /// Serializes `value` to JSON and queues it as a text frame.
    pub fn send_json<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), SendError> {
        let json = serde_json::to_vec(value).map_err(SendError::Serialize)?;
        self.send_frame(self.encode(frame::OpCode::Text, &json))
    }

    /// Queues a binary frame.
    pub fn send_binary(&self, data: impl AsRef<[u8]>) -> Result<(), SendError> {
        self.send_frame(self.encode(frame::OpCode::Binary, data.as_ref()))
    }

    /// A frame for this connection alone: compressed for it when it agreed to permessage-deflate
    /// and the payload is worth it.
    fn encode(&self, opcode: frame::OpCode, payload: &[u8]) -> Bytes {
        crate::deflate::frame_for(self.conn.deflate(), opcode, payload)
    }

    pub(crate) fn send_frame(&self, frame: Bytes) -> Result<(), SendError> {
        match self.conn.push(frame, NO_TOPIC) {
            Push::Queued | Push::QueuedDropping(_) | Push::Written => Ok(()),
            Push::Closed => Err(SendError::Closed),
            Push::Overflow => Err(SendError::QueueFull),
        }
    }

    /// Closes the connection with `code` and `reason` after what is already queued is sent.
    pub fn close(&self, code: u16, reason: &str) {
        self.conn.close(code, reason, true);
    }

    /// Whether the connection is closing or closed.
    pub fn is_closed(&self) -> bool {
        self.conn.is_ending()
    }
}
