//! The in-process broker: used when no Redis URL is configured.
//!
//! Publishing sends straight into this instance's dispatcher channel, which makes the dispatcher
//! the single point that orders every topic's messages. The channel is bounded: a publisher
//! waits while the dispatcher is behind instead of queuing without limit.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Pending, PublishError};
use crate::dispatch::Published;
use crate::shard::TopicInterest;

#[derive(Debug, Clone)]
pub(crate) struct LocalBroker {
    tx: mpsc::Sender<Published>,
    /// Whether topics may have history: then a publish waits for its position.
    positions: bool,
}

impl LocalBroker {
    pub(crate) fn new(tx: mpsc::Sender<Published>, positions: bool) -> Self {
        Self { tx, positions }
    }

    /// Hands `payload` to the dispatcher; with history enabled, the position the dispatcher
    /// assigns it follows (`None` on a topic without history).
    pub(crate) async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
    ) -> Result<Pending, PublishError> {
        let (reply, position) = if self.positions {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.tx
            .send(Published {
                position: None,
                topic: Arc::from(topic),
                payload,
                since: std::time::Instant::now(),
                reply,
            })
            .await
            .map_err(|_| PublishError::Closed)?;
        Ok(match position {
            Some(rx) => Pending::Assigning(rx),
            None => Pending::Known(None),
        })
    }
}

/// In-process, every topic is always "subscribed": nothing to track.
#[derive(Debug)]
pub(crate) struct NoInterest;

impl TopicInterest for NoInterest {
    fn first_in_shard(&self, _topic: &Arc<str>) {}
    fn last_in_shard(&self, _topic: &Arc<str>) {}
}
