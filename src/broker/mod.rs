//! The broker seam: where published messages go, and where delivered ones come from.
//!
//! A broker has two jobs. `publish` hands one payload for one topic to every instance (this one
//! included). Delivery flows the other way: the broker feeds each message it receives, in its own
//! order, into the instance's [`Dispatcher`](crate::dispatch::Dispatcher) channel. Which topics an
//! instance needs is told to the broker through [`TopicInterest`](crate::shard::TopicInterest)
//! when a topic gains its first or loses its last local subscriber.
//!
//! [`BrokerHandle`] is an enum rather than a trait object: there are few kinds, and the publish
//! path then needs no boxing.

mod cluster;
mod connect;
mod stream;

#[cfg(feature = "redis-tls")]
pub use connect::RedisTls;
pub(crate) use connect::RedisTls as TlsSettings;
pub(crate) mod local;
mod positioned;
mod presence;
pub(crate) use presence::parse_event as parse_presence_event;
mod publisher;
pub(crate) mod redis;
mod resp;
mod sentinel;
mod slots;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::history::Position;
use crate::shard::TopicInterest;

/// How to reach Redis: the URL, the channel prefix and, for `rediss://`, TLS settings.
pub(crate) struct RedisSettings {
    pub(crate) url: String,
    pub(crate) prefix: String,
    pub(crate) tls: Option<TlsSettings>,
}

/// Why a publish failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum PublishError {
    /// The event could not be serialized to JSON.
    Serialize(serde_json::Error),
    /// The broker is unreachable or refused the message.
    Unavailable(String),
    /// The broker did not confirm within the publish timeout.
    Timeout,
    /// The service is shutting down.
    Closed,
    /// [`publish_raw`](crate::ws::service::WebsocketService::publish_raw) was given a payload
    /// that is not UTF-8: subscribers receive text frames, and a browser fails the connection on
    /// a text frame that is not UTF-8. Nothing was published.
    NotText,
}

impl PublishError {
    /// Whether the failure is transient (broker down, slow or restarting), so a retry may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout)
    }
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Serialize(e) => write!(f, "event serialization failed: {e}"),
            Self::Unavailable(e) => write!(f, "broker unavailable: {e}"),
            Self::Timeout => f.write_str("broker did not confirm the publish in time"),
            Self::Closed => f.write_str("service is shutting down"),
            Self::NotText => f.write_str("payload is not UTF-8 and cannot be sent as text"),
        }
    }
}

impl std::error::Error for PublishError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Serialize(e) => Some(e),
            _ => None,
        }
    }
}

/// The position of a publication the broker accepted: known, or still being assigned by the
/// dispatcher (which answers before it hands the publication to the shards).
#[derive(Debug)]
pub(crate) enum Pending {
    Known(Option<Position>),
    Assigning(tokio::sync::oneshot::Receiver<Option<Position>>),
}

impl Pending {
    pub(crate) async fn position(self) -> Option<Position> {
        match self {
            Self::Known(p) => p,
            // A payload too large to deliver is dropped unanswered: no position.
            Self::Assigning(rx) => rx.await.unwrap_or(None),
        }
    }
}

/// The broker an instance runs with.
#[derive(Debug, Clone)]
pub(crate) enum BrokerHandle {
    Local(local::LocalBroker),
    Redis(redis::RedisBroker),
}

impl BrokerHandle {
    /// Publishes `payload` verbatim on `topic`; its position follows if the topic keeps
    /// history.
    pub(crate) async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
    ) -> Result<Pending, PublishError> {
        match self {
            Self::Local(b) => b.publish(topic, payload).await,
            Self::Redis(b) => b.publish_at(topic, payload).await.map(Pending::Known),
        }
    }

    /// Whether the broker connection is up (always true in-process).
    pub(crate) fn is_live(&self) -> bool {
        match self {
            Self::Local(_) => true,
            Self::Redis(b) => b.is_live(),
        }
    }

    /// The hook the shards call when a topic appears or disappears locally.
    pub(crate) fn interest(&self) -> Arc<dyn TopicInterest> {
        match self {
            Self::Local(_) => Arc::new(local::NoInterest),
            Self::Redis(b) => b.interest(),
        }
    }

    /// Resolves once the broker delivers `topic` to this instance (at once in-process); `Err`
    /// with the broker's reason if it refused the subscription.
    pub(crate) async fn wait_subscribed(&self, topic: &str) -> Result<(), String> {
        match self {
            Self::Redis(b) => b.wait_subscribed(topic).await,
            Self::Local(_) => Ok(()),
        }
    }

    /// Stops background tasks (the service is being dropped).
    pub(crate) fn stop(&self) {
        if let Self::Redis(b) = self {
            b.stop();
        }
    }
}
