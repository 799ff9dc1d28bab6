//! The engine behind a [`WebsocketService`](crate::ws::service::WebsocketService), independent
//! of the application's handler type: shards, dispatcher, broker, connection accounting, shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use crate::broker::{BrokerHandle, PublishError, local::LocalBroker};
use crate::config::Config;
use crate::frame::close_code;
use crate::metrics::Metrics;
use crate::outbound::Conn;
use crate::shard::{self, Command, Dispatcher, Published};

/// Capacity of the channel between the broker and the dispatcher.
const DISPATCH_CHANNEL: usize = 8192;

#[derive(Debug)]
pub(crate) struct Runtime {
    pub(crate) config: Config,
    shards: Arc<[mpsc::Sender<Command>]>,
    pub(crate) broker: BrokerHandle,
    pub(crate) metrics: Arc<Metrics>,
    /// Random per instance, so connection ids are unique across instances.
    instance: u64,
    next_conn: AtomicU64,
    shutting_down: AtomicBool,
    /// Signalled whenever a connection ends, for `shutdown` to re-check the active count.
    conn_ended: Notify,
}

impl Runtime {
    /// Starts shards, dispatcher and broker. Must be called inside a tokio runtime.
    pub(crate) fn start(config: Config) -> Self {
        let metrics = Arc::new(Metrics::default());
        let (pub_tx, pub_rx) = mpsc::channel::<Published>(DISPATCH_CHANNEL);
        let broker = BrokerHandle::Local(LocalBroker::new(pub_tx));
        let interest = broker.interest();
        let shards: Arc<[_]> = (0..config.shards.max(1))
            .map(|_| shard::spawn_shard(config.shard_channel, interest.clone(), metrics.clone()))
            .collect();
        tokio::spawn(Dispatcher::new(shards.clone()).run(pub_rx));
        Self {
            config,
            shards,
            broker,
            metrics,
            instance: rand_u64(),
            next_conn: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            conn_ended: Notify::new(),
        }
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// A new connection, assigned round-robin to a shard.
    pub(crate) fn new_conn(&self) -> Arc<Conn> {
        let n = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let shard = (n % self.shards.len() as u64) as usize;
        Arc::new(Conn::new(
            Uuid::from_u64_pair(self.instance, n),
            shard,
            self.config.outbound_queue_bytes,
        ))
    }

    /// Subscribes `conn` to `topic` in its shard; resolves once the subscription is in place.
    pub(crate) async fn subscribe(&self, conn: &Arc<Conn>, topic: Arc<str>) -> bool {
        let (done, wait) = oneshot::channel();
        let cmd = Command::Subscribe {
            conn: conn.clone(),
            topic,
            done,
        };
        self.shards[conn.shard].send(cmd).await.is_ok() && wait.await.is_ok()
    }

    /// Removes `conn` from every topic it joined.
    pub(crate) async fn remove(&self, conn: &Conn) {
        let _ = self.shards[conn.shard]
            .send(Command::Remove { conn_id: conn.id })
            .await;
    }

    pub(crate) async fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PublishError> {
        if self.is_shutting_down() {
            return Err(PublishError::Closed);
        }
        let res = self.broker.publish(topic, payload).await;
        self.metrics.published(res.is_ok());
        res
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub(crate) fn connection_opened(&self) {
        self.metrics.connection_opened();
    }

    pub(crate) fn connection_closed(&self) {
        self.metrics.connection_closed();
        self.conn_ended.notify_waiters();
    }

    /// Stops new connections, closes every open one with 1001 after its queue is flushed, and
    /// waits (up to the shutdown timeout) until every connection has run `on_disconnect`.
    pub(crate) async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        for shard in self.shards.iter() {
            let (done, wait) = oneshot::channel();
            let cmd = Command::CloseAll {
                code: close_code::GOING_AWAY,
                reason: "server shutting down",
                done,
            };
            if shard.send(cmd).await.is_ok() {
                let _ = wait.await;
            }
        }
        let all_closed = async {
            loop {
                let ended = self.conn_ended.notified();
                if self.metrics.snapshot().connections_active == 0 {
                    return;
                }
                ended.await;
            }
        };
        if tokio::time::timeout(self.config.shutdown_timeout, all_closed)
            .await
            .is_err()
        {
            tracing::warn!(
                active = self.metrics.snapshot().connections_active,
                "shutdown timeout: connections still open"
            );
        }
    }
}

/// A random u64 without another dependency: v4 UUIDs are random.
fn rand_u64() -> u64 {
    Uuid::new_v4().as_u64_pair().0
}
