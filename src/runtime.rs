//! The engine behind a [`WebsocketService`](crate::ws::service::WebsocketService), independent
//! of the application's handler type: shards, dispatcher, broker, connection accounting, shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use crate::broker::{
    BrokerHandle, PublishError, RedisSettings, local::LocalBroker, redis::RedisBroker,
};
use crate::config::Config;
use crate::deflate::Agreed;
use crate::dispatch::{Dispatcher, EndEpoch, Fetch, Published, Request};
use crate::frame::close_code;
use crate::history::{HistoryPage, PolicyRule, Position, RecoveryLimits, Streams};
use crate::metrics::Metrics;
use crate::outbound::Conn;
use crate::presence::{Identity, Presence};
use crate::routes::{Routed, Routes};
use crate::shard::{self, Command};
use crate::wire::Format;

/// Capacity of the channel between the broker and the dispatcher. Every channel of the runtime is
/// bounded: a producer that gets ahead waits instead of queuing without limit (invariant 4,
/// docs/architecture.md).
pub(crate) const DISPATCH_CHANNEL: usize = 8192;
/// Capacity of the channel of requests to the dispatcher (`rtk1` joins, history reads).
const REQUEST_CHANNEL: usize = 1024;
/// Capacity of the channel of presence events from Redis; a full one drops events (`join` and
/// `leave` are at most once).
const PRESENCE_EVENTS: usize = 4096;

/// What a connection needs to join and leave topics: the shards and the broker. Shared (in an
/// `Arc`) by the runtime and every [`WsSink`](crate::ws::types::WsSink).
#[derive(Debug)]
pub(crate) struct Hub {
    shards: Arc<[mpsc::Sender<Command>]>,
    /// Which shards hold each topic (set by the shards, read by the dispatcher).
    routes: Arc<Routes>,
    pub(crate) broker: BrokerHandle,
    /// Requests to the dispatcher, the owner of the history.
    requests: mpsc::Sender<Request>,
    /// Connections speaking `rtk1` now (see [`Rtk1Conn`]).
    pub(crate) rtk1_conns: Arc<AtomicUsize>,
    /// Longest topic name a connection may join.
    pub(crate) max_topic_len: usize,
    /// Most topics one connection may be in at once.
    pub(crate) max_topics: usize,
    /// Who is in the topics that track presence.
    pub(crate) presence: Arc<Presence>,
}

/// What came of [`Hub::join`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JoinOutcome {
    /// Subscribed (or already was); with Redis, confirmed or given up waiting for.
    Subscribed,
    /// The connection is already in `max_topics_per_connection` topics.
    TooManyTopics,
    /// The broker refused the subscription (a Redis ACL, say), with its reason; the connection
    /// was taken out of the topic again.
    Refused(String),
    /// The runtime is gone.
    Gone,
}

impl Hub {
    /// Subscribes `conn` to `topic` in its shard (within the per-connection topic limit), then
    /// waits until the broker delivers the topic to this instance. A topic the broker refuses
    /// is left again.
    pub(crate) async fn join(
        &self,
        conn: &Arc<Conn>,
        topic: &str,
        who: Option<&Identity>,
    ) -> JoinOutcome {
        self.join_from(conn, topic, None, who).await
    }

    /// [`join`](Self::join), for an `rtk1` connection recovering from `since` (an epoch and
    /// the last offset it has): the dispatcher subscribes it, with its `subscribed` message and
    /// what it recovered (see `dispatch.rs`). A verbatim connection joins its shard directly.
    /// With `who`, a topic that tracks presence counts the connection as that user's.
    pub(crate) async fn join_from(
        &self,
        conn: &Arc<Conn>,
        topic: &str,
        since: Option<(String, u64)>,
        who: Option<&Identity>,
    ) -> JoinOutcome {
        let (done, wait) = oneshot::channel();
        let sent = if conn.format == Format::Rtk1 {
            let req = Request::Join {
                conn: conn.clone(),
                topic: Arc::from(topic),
                since,
                max_topics: self.max_topics,
                done,
            };
            self.requests.send(req).await.is_ok()
        } else {
            let topic = Arc::from(topic);
            let cmd = Command::Subscribe {
                conn: conn.clone(),
                expected: Some(self.routes.expect(&topic)),
                topic,
                max_topics: self.max_topics,
                done,
                prelude: Vec::new(),
                positioned: false,
            };
            self.shards[conn.shard].send(cmd).await.is_ok()
        };
        if !sent {
            return JoinOutcome::Gone;
        }
        match wait.await {
            Ok(true) => match self.broker.wait_subscribed(topic).await {
                Ok(()) => {
                    if let Some(who) = who {
                        self.presence.add(topic, conn.id, who).await;
                    }
                    JoinOutcome::Subscribed
                }
                Err(why) => {
                    self.leave(conn, topic).await;
                    JoinOutcome::Refused(why)
                }
            },
            Ok(false) => JoinOutcome::TooManyTopics,
            Err(_) => JoinOutcome::Gone,
        }
    }

    /// Removes `conn` from `topic`, and from its presence.
    pub(crate) async fn leave(&self, conn: &Conn, topic: &str) {
        self.leave_shard(conn, topic).await;
        if self.presence.enabled(topic) {
            self.presence.remove(topic, conn.id).await;
        }
    }

    /// Removes `conn` from `topic` in its shard only: it stays present (it joins again at
    /// once, as an `rtk1` subscribe to a topic it is in does).
    pub(crate) async fn leave_shard(&self, conn: &Conn, topic: &str) {
        let cmd = Command::Unsubscribe {
            conn_id: conn.id,
            topic: Arc::from(topic),
        };
        let _ = self.shards[conn.shard].send(cmd).await;
    }

    /// Asks the dispatcher; `None` if it is gone.
    async fn ask<T>(&self, req: impl FnOnce(oneshot::Sender<T>) -> Request) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.requests.send(req(tx)).await.ok()?;
        rx.await.ok()
    }

    /// The position of `topic`'s last publication; `None` for a topic without history.
    pub(crate) async fn stream_top(&self, topic: &str) -> Option<Position> {
        let topic = Arc::from(topic);
        self.ask(|reply| Request::Top { topic, reply })
            .await
            .flatten()
    }

    /// A page of `topic`'s history; `None` for a topic without history.
    pub(crate) async fn history(
        &self,
        topic: &str,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> Option<HistoryPage> {
        let topic = Arc::from(topic);
        self.ask(|reply| Request::Page {
            topic,
            since,
            limit,
            reverse,
            reply,
        })
        .await
        .flatten()
    }

    /// Forgets `topic`'s stream; whether it had one. With Redis, the stream is deleted there
    /// first (Redis assigns the positions: forgetting only this instance's copy would let the
    /// old epoch go on); if Redis cannot be reached, only this instance's copy is forgotten.
    pub(crate) async fn remove_history(&self, topic: &str) -> bool {
        let shared = match &self.broker {
            BrokerHandle::Redis(redis) => match redis.remove_stream(topic).await {
                Ok(removed) => removed,
                Err(e) => {
                    tracing::warn!(topic, error = %e, "deleting a topic's stream from Redis failed");
                    false
                }
            },
            BrokerHandle::Local(_) => false,
        };
        let topic = Arc::from(topic);
        let local = self
            .ask(|reply| Request::Remove { topic, reply })
            .await
            .unwrap_or(false);
        shared || local
    }

    /// Removes `conn` from every topic it joined; from presence at once if it ended `clean`
    /// (a close handshake, a shutdown), after the presence grace otherwise.
    pub(crate) async fn remove(&self, conn: &Conn, clean: bool) {
        let _ = self.shards[conn.shard]
            .send(Command::Remove { conn_id: conn.id })
            .await;
        self.presence.remove_conn(conn.id, clean).await;
    }
}

#[derive(Debug)]
pub(crate) struct Runtime {
    pub(crate) config: Config,
    pub(crate) hub: Arc<Hub>,
    pub(crate) metrics: Arc<Metrics>,
    /// Labels on every metric this service reports.
    metric_labels: Arc<[metrics::Label]>,
    /// Random per instance, so connection ids are unique across instances.
    instance: u64,
    next_conn: AtomicU64,
    shutting_down: AtomicBool,
    /// Connections admitted (upgrade accepted, connection not yet ended).
    admitted: Arc<AtomicUsize>,
    /// Signalled whenever a connection ends, for `shutdown` to re-check the active count.
    conn_ended: Notify,
}

impl Runtime {
    /// Starts shards, dispatcher and broker. Must be called inside a tokio runtime.
    pub(crate) fn start(
        config: Config,
        redis: Option<RedisSettings>,
        policy: Option<PolicyRule>,
    ) -> Result<Self, String> {
        let metrics = Arc::new(Metrics::default());
        let instance = rand_u64();
        let (pub_tx, pub_rx) = mpsc::channel::<Published>(DISPATCH_CHANNEL);
        let (req_tx, req_rx) = mpsc::channel::<Request>(REQUEST_CHANNEL);
        // With Redis, Redis assigns positions and the dispatcher's history caches them.
        let from_redis = redis.is_some();
        let broker = match redis {
            None => BrokerHandle::Local(LocalBroker::new(pub_tx, policy.is_some())),
            Some(settings) => BrokerHandle::Redis(
                RedisBroker::start(settings, instance, pub_tx, metrics.clone())?
                    .positioned(policy.clone())
                    .presence_ttl(config.presence_ttl),
            ),
        };
        let interest = broker.interest();
        let shard_count = config.shards.max(1);
        let routes = Arc::new(Routes::new(shard_count, policy.clone()));
        let shards: Arc<[_]> = (0..shard_count)
            .map(|shard| {
                let interest = Arc::new(Routed {
                    routes: routes.clone(),
                    shard,
                    broker: interest.clone(),
                });
                shard::spawn_shard(config.shard_channel, interest, metrics.clone())
            })
            .collect();
        let rtk1_conns = Arc::new(AtomicUsize::new(0));
        let recovery = RecoveryLimits {
            count: config.recovery_max_publications,
            bytes: config.outbound_queue_bytes / 2,
        };
        let presence = Arc::new(Presence::new(
            policy.clone(),
            shards.clone(),
            routes.clone(),
            broker.clone(),
            config.presence_grace,
        ));
        if let (BrokerHandle::Redis(redis), true) = (&broker, presence.possible()) {
            // Presence events from Redis: a few per membership change, not per publication.
            let (events_tx, mut events) = mpsc::channel::<(Arc<str>, Bytes)>(PRESENCE_EVENTS);
            redis.on_presence(events_tx);
            let weak = Arc::downgrade(&presence);
            tokio::spawn(async move {
                while let Some((topic, payload)) = events.recv().await {
                    let Some(presence) = weak.upgrade() else {
                        return;
                    };
                    if let Some(frame) = crate::presence::event_frame_from_redis(&topic, &payload) {
                        presence.deliver(topic, frame).await;
                    }
                }
            });
            tokio::spawn(Presence::refresh_periodically(
                Arc::downgrade(&presence),
                config.presence_refresh,
            ));
        }
        let mut streams = Streams::new(policy, config.history_max_bytes);
        if from_redis {
            streams = streams.external();
        }
        let mut dispatcher =
            Dispatcher::bounded(shards.clone(), config.outbound_queue_bytes, metrics.clone())
                .with_positions(streams, recovery, rtk1_conns.clone())
                .routed(routes.clone());
        if let BrokerHandle::Redis(redis) = &broker {
            let reader = redis.clone();
            let fetch = Fetch(Arc::new(move |topic: Arc<str>, from, to| {
                let redis = reader.clone();
                Box::pin(async move { redis.read_range(&topic, from, to).await })
            }));
            let ender = redis.clone();
            let end_epoch = EndEpoch(Arc::new(move |topic: Arc<str>, epoch: String| {
                let redis = ender.clone();
                tokio::spawn(async move {
                    if let Err(e) = redis.end_epoch(&topic, &epoch).await {
                        tracing::warn!(topic = %topic, error = %e, "ending an epoch in Redis failed");
                    }
                });
            }));
            dispatcher = dispatcher.broker_positions(fetch).end_epoch(end_epoch);
            // No connection exists yet, so no topic is subscribed: every publication of a
            // topic takes the same way from the first.
            redis.deliver_with(dispatcher.fanout());
        }
        tokio::spawn(dispatcher.run(pub_rx, req_rx));
        let hub = Arc::new(Hub {
            shards,
            routes,
            broker,
            requests: req_tx,
            rtk1_conns,
            max_topic_len: config.max_topic_len,
            max_topics: config.max_topics_per_connection.max(1),
            presence,
        });
        let metric_labels: Arc<[metrics::Label]> = config
            .metrics_labels
            .iter()
            .map(|(k, v)| metrics::Label::new(k.clone(), v.clone()))
            .collect();
        if !config.metrics_interval.is_zero() {
            tokio::spawn(export_periodically(
                Arc::downgrade(&hub),
                metrics.clone(),
                metric_labels.clone(),
                config.metrics_interval,
            ));
        }
        Ok(Self {
            config,
            hub,
            metric_labels,
            metrics,
            instance,
            next_conn: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            admitted: Arc::new(AtomicUsize::new(0)),
            conn_ended: Notify::new(),
        })
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.hub.shards.len()
    }

    pub(crate) fn broker(&self) -> &BrokerHandle {
        &self.hub.broker
    }

    /// A new connection speaking `format`, with what was agreed about permessage-deflate,
    /// assigned round-robin to a shard.
    pub(crate) fn new_conn_as(&self, format: Format, deflate: Option<Agreed>) -> Arc<Conn> {
        let n = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let shard = (n % self.hub.shards.len() as u64) as usize;
        Arc::new(
            Conn::new(
                Uuid::from_u64_pair(self.instance, n),
                shard,
                self.config.outbound_queue_bytes,
                self.config.slow_consumer,
            )
            .with_lag_limits(
                self.config.outbound_queue_ceiling,
                self.config.slow_consumer_grace,
            )
            .with_format(format)
            .with_deflate(deflate),
        )
    }

    pub(crate) async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
    ) -> Result<Option<Position>, PublishError> {
        if self.is_shutting_down() {
            return Err(PublishError::Closed);
        }
        let res = self.hub.broker.publish(topic, payload).await;
        // Counted once the broker accepted it, as without positions: the position may come
        // after the subscribers have it.
        self.metrics.published(res.is_ok());
        Ok(res?.position().await)
    }

    /// Reserves a connection slot, or `None` at `max_connections`. The slot is released when the
    /// returned guard is dropped (the connection ended, or the upgrade never completed).
    pub(crate) fn try_admit(&self) -> Option<Admission> {
        let max = self.config.max_connections;
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Admission(self.admitted.clone()))
    }

    /// Reports the current values to the `metrics` facade now.
    pub(crate) fn export_metrics(&self) {
        crate::metrics::export(
            &self.metrics,
            &self.metric_labels,
            self.hub.broker.is_live(),
        );
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
        // The other instances see this one's users leave now, not once its entries expire.
        self.hub.presence.shutdown().await;
        for shard in self.hub.shards.iter() {
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

/// Reports the counters every `every` until the service (its hub) is gone.
async fn export_periodically(
    hub: std::sync::Weak<Hub>,
    metrics: Arc<Metrics>,
    labels: Arc<[metrics::Label]>,
    every: std::time::Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(hub) = hub.upgrade() else { return };
        crate::metrics::export(&metrics, &labels, hub.broker.is_live());
    }
}

/// Counts one connection speaking `rtk1` while it lives, so the dispatcher frames `rtk1`
/// envelopes only while someone needs them.
#[derive(Debug)]
pub(crate) struct Rtk1Conn(Arc<AtomicUsize>);

impl Rtk1Conn {
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Rtk1Conn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One admitted connection's slot; see [`Runtime::try_admit`].
#[derive(Debug)]
pub(crate) struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.hub.broker.stop();
    }
}

/// A random u64 without another dependency: v4 UUIDs are random.
fn rand_u64() -> u64 {
    Uuid::new_v4().as_u64_pair().0
}
