//! The in-process broker: used when no Redis URL is configured.
//!
//! Publishing sends straight into this instance's dispatcher channel, which makes the dispatcher
//! the single point that orders every topic's messages. The channel is bounded: a publisher
//! waits while the dispatcher is behind instead of queuing without limit.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::PublishError;
use crate::dispatch::Published;
use crate::shard::TopicInterest;

#[derive(Debug, Clone)]
pub(crate) struct LocalBroker {
    tx: mpsc::Sender<Published>,
}

impl LocalBroker {
    pub(crate) fn new(tx: mpsc::Sender<Published>) -> Self {
        Self { tx }
    }

    pub(crate) async fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PublishError> {
        self.tx
            .send(Published {
                topic: Arc::from(topic),
                payload,
                since: std::time::Instant::now(),
            })
            .await
            .map_err(|_| PublishError::Closed)
    }
}

/// In-process, every topic is always "subscribed": nothing to track.
#[derive(Debug)]
pub(crate) struct NoInterest;

impl TopicInterest for NoInterest {
    fn first_in_shard(&self, _topic: &Arc<str>) {}
    fn last_in_shard(&self, _topic: &Arc<str>) {}
}
