//! Small types shared by the public API.

pub use crate::sink::{SendError, WsSink};

/// A unique identifier for one WebSocket connection.
pub type ConnectionId = uuid::Uuid;

/// A topic name. With Redis it is also the Pub/Sub channel name (plus an optional prefix).
pub type Topic = String;
