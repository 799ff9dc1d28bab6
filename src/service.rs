//! [`WebsocketService`]: the handle to one instance of the runtime — the engine, the
//! application's handler and its state — and the builder that starts it. Public at
//! `ws::service`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use serde::Serialize;

use crate::broker::{PublishError, RedisSettings, TlsSettings};
use crate::config::Config;
use crate::handler::MessageHandler;
use crate::history::{HistoryPage, PolicyRule, Position, TopicPolicy};
use crate::metrics::MetricsSnapshot;
use crate::outbound::SlowConsumerPolicy;
use crate::presence::{Identity, PresenceError, PresencePage, PresenceStats};
use crate::runtime::Runtime;

/// Manages every WebSocket connection of this instance for one [`MessageHandler`].
///
/// Create one at start-up (it spawns its shard and dispatcher tasks, so a tokio runtime must be
/// running), keep the `Arc` in your axum state, and route upgrades to it with
/// [`upgrade_handler`](crate::ws::upgrade::upgrade_handler).
pub struct WebsocketService<H: MessageHandler> {
    pub(crate) runtime: Runtime,
    pub(crate) handler: H,
    pub(crate) app_state: Arc<H::AppState>,
    /// Authorises the topics `rtk1` clients subscribe to with a command.
    pub(crate) topic_rule: Option<TopicRule<H>>,
    /// Who a user is in presence topics: an id and the application's info.
    presence_user: Option<PresenceUserFn<H>>,
}

/// The application's rule naming a user in presence: their id and info.
type PresenceUserFn<H> =
    Arc<dyn Fn(&<H as MessageHandler>::UserId) -> (String, serde_json::Value) + Send + Sync>;

/// The application's rule for a topic a client asks for: `Ok` to let it in, else the status it
/// would have been refused with at the upgrade.
pub(crate) type TopicRule<H> = Arc<
    dyn Fn(
            Arc<<H as MessageHandler>::AppState>,
            <H as MessageHandler>::UserId,
            String,
        ) -> Pin<Box<dyn Future<Output = Result<(), StatusCode>> + Send>>
        + Send
        + Sync,
>;

impl<H: MessageHandler> std::fmt::Debug for WebsocketService<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebsocketService")
            .field("shards", &self.runtime.shard_count())
            .field("broker", self.runtime.broker())
            .field("metrics", &self.metrics())
            .finish_non_exhaustive()
    }
}

impl<H: MessageHandler> WebsocketService<H> {
    /// Creates a service with default settings, as in 0.1.0.
    ///
    /// An empty `redis_url` selects the in-process broker (one instance, nothing to run beside
    /// it).
    ///
    /// # Panics
    /// If `redis_url` is not empty and not a usable Redis URL (`redis://`, `redis+unix://` or
    /// `unix://`; `rediss://` with the `redis-tls` feature). To report a configuration error
    /// instead, e.g. one line on stderr and a non-zero exit, use [`builder`](Self::builder) and
    /// [`WebsocketServiceBuilder::try_build`], as `examples/basic_chat` does.
    pub fn new(redis_url: &str, handler: H, app_state: Arc<H::AppState>) -> Arc<Self> {
        let url = (!redis_url.is_empty()).then_some(redis_url);
        Self::builder(handler, app_state).redis_url(url).build()
    }

    /// Starts a builder for the shard count, broker choice and limits.
    pub fn builder(handler: H, app_state: Arc<H::AppState>) -> WebsocketServiceBuilder<H> {
        WebsocketServiceBuilder {
            handler,
            app_state,
            config: Config::default(),
            redis_url: None,
            redis_tls: None,
            channel_prefix: String::new(),
            policy: None,
            topic_rule: None,
            presence_user: None,
        }
    }

    /// Who `user` is in presence topics, when a topic may track presence (a policy rule is
    /// set): the application's [`presence_user`](WebsocketServiceBuilder::presence_user), or
    /// the user's `Debug` text with no info.
    pub(crate) fn identity(&self, user: &H::UserId) -> Option<Arc<Identity>> {
        if !self.runtime.hub.presence.possible() {
            return None;
        }
        let (id, info) = match &self.presence_user {
            Some(f) => f(user),
            None => (format!("{user:?}"), serde_json::Value::Null),
        };
        Some(Arc::new(Identity::new(id, &info)))
    }

    /// The application state the service was built with.
    pub fn app_state(&self) -> &Arc<H::AppState> {
        &self.app_state
    }

    /// The handler the service was built with.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Serializes `event` once and publishes it to every subscriber of `topic` on every instance.
    /// Callable from any route or task.
    ///
    /// On a topic with history (a [`TopicPolicy`], see
    /// [`WebsocketServiceBuilder::topic_policy`]) it returns the publication's position;
    /// `Ok(None)` otherwise.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        event: &T,
    ) -> Result<Option<Position>, PublishError> {
        let payload = serde_json::to_vec(event).map_err(PublishError::Serialize)?;
        self.runtime.publish(topic, Bytes::from(payload)).await
    }

    /// Publishes `payload` verbatim; subscribers receive it as a text frame.
    ///
    /// A payload that is not UTF-8 is refused with [`PublishError::NotText`] and nothing is
    /// published. (What another program publishes on the Redis channel directly is not checked
    /// there: a payload that is not UTF-8 reaches subscribers as a binary frame, and one whose
    /// frame is larger than [`outbound_queue_bytes`](WebsocketServiceBuilder::outbound_queue_bytes)
    /// is dropped and counted in [`MetricsSnapshot::broker_oversized_drops`].)
    ///
    /// Returns the publication's position on a topic with history, as
    /// [`publish`](Self::publish) does.
    pub async fn publish_raw(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<Option<Position>, PublishError> {
        let payload = payload.into();
        if std::str::from_utf8(&payload).is_err() {
            return Err(PublishError::NotText);
        }
        self.runtime.publish(topic, payload).await
    }

    /// Up to `limit` publications of `topic`'s history: those after offset `since` (from the
    /// oldest kept without), oldest first; with `reverse`, the newest ones (before `since` if
    /// given), newest first. With the stream's top, so the page can be placed in the stream.
    /// `None` for a topic without history.
    pub async fn history(
        &self,
        topic: &str,
        since: Option<u64>,
        limit: usize,
        reverse: bool,
    ) -> Option<HistoryPage> {
        self.runtime.hub.history(topic, since, limit, reverse).await
    }

    /// The position of `topic`'s last publication (offset 0 before the first); `None` for a
    /// topic without history.
    ///
    /// Lets an application load its own state and then have a client subscribe from that
    /// position without a gap: read the top, load the state (which includes every publication
    /// up to the top), and give the client both; it connects with `since`/`epoch` set to that
    /// top and receives every later publication (see the recovery guide).
    pub async fn stream_top(&self, topic: &str) -> Option<Position> {
        self.runtime.hub.stream_top(topic).await
    }

    /// Forgets `topic`'s history and its stream's identity: the next publication starts a new
    /// epoch, and clients recovering with a position of the old one get `recovered: false`.
    /// Returns whether the topic had a stream. With Redis, the stream is deleted from Redis, so
    /// every instance sees the new epoch (if Redis cannot be reached, a warning is logged and
    /// only this instance's copy is forgotten).
    pub async fn remove_history(&self, topic: &str) -> bool {
        self.runtime.hub.remove_history(topic).await
    }

    /// The users in `topic`, on every instance, with their connection counts and info: a page
    /// of about `limit` users (at most 10 000) from `cursor` on (`None` for the first page, then the previous
    /// page's [`next`](PresencePage::next)). Pages follow the user id in-process; with Redis,
    /// Redis's scan order, and a user may appear on two pages if the topic changes meanwhile.
    ///
    /// [`PresenceError::NotEnabled`] for a topic whose [`TopicPolicy`] does not track presence
    /// (see [`TopicPolicy::presence`]).
    pub async fn presence(
        &self,
        topic: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<PresencePage, PresenceError> {
        self.runtime.hub.presence.list(topic, cursor, limit).await
    }

    /// How many users and connections `topic` has, on every instance: two counters, as cheap
    /// for 100 000 members as for 2. Errors as [`presence`](Self::presence).
    pub async fn presence_stats(&self, topic: &str) -> Result<PresenceStats, PresenceError> {
        self.runtime.hub.presence.stats(topic).await
    }

    /// Whether the broker connection is live (always true for the in-process broker). Serve it
    /// as a readiness probe. On Redis Cluster: the slot table was read and every primary in it
    /// answers this instance's probe (a primary the cluster flagged as failed is out of the
    /// table: its partitions' publishes fail, the instance stays ready).
    pub fn is_ready(&self) -> bool {
        !self.runtime.is_shutting_down() && self.runtime.broker().is_live()
    }

    /// Number of shards connections are spread over.
    pub fn shard_count(&self) -> usize {
        self.runtime.shard_count()
    }

    /// A copy of the service's counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.runtime.metrics.snapshot()
    }

    /// Reports the current counters and gauges to the process's [`metrics`] recorder now.
    ///
    /// The service already does this every second (see
    /// [`WebsocketServiceBuilder::metrics_interval`]); call it before rendering a scrape to make
    /// the values exact. Without an installed recorder it does nothing. The names and meanings
    /// are listed in the crate docs' `# Metrics` section.
    pub fn export_metrics(&self) {
        self.runtime.export_metrics();
    }

    /// Graceful shutdown: refuses new connections (503), sends close 1001 to every client after
    /// what is queued for it, and waits — up to the shutdown timeout — until every connection has
    /// ended and run `on_disconnect`.
    pub async fn shutdown(&self) {
        self.runtime.shutdown().await;
    }
}

/// Builds a [`WebsocketService`] with non-default settings.
///
/// ```no_run
/// # use axum_realtime_kit::ws::service::WebsocketService;
/// # fn demo<H: axum_realtime_kit::ws::handler::MessageHandler>(h: H, s: std::sync::Arc<H::AppState>) {
/// let service = WebsocketService::builder(h, s)
///     .shards(4)
///     .redis_url(std::env::var("REDIS_URL").ok())
///     .max_message_size(16 * 1024)
///     .build();
/// # }
/// ```
#[must_use]
pub struct WebsocketServiceBuilder<H: MessageHandler> {
    handler: H,
    app_state: Arc<H::AppState>,
    config: Config,
    redis_url: Option<String>,
    redis_tls: Option<TlsSettings>,
    channel_prefix: String,
    policy: Option<PolicyRule>,
    topic_rule: Option<TopicRule<H>>,
    presence_user: Option<PresenceUserFn<H>>,
}

/// Prints the settings, with the Redis URL's password replaced by `***`, and the handler and
/// state by their type names.
impl<H: MessageHandler> std::fmt::Debug for WebsocketServiceBuilder<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebsocketServiceBuilder")
            .field("handler", &std::any::type_name::<H>())
            .field("config", &self.config)
            .field("redis_url", &self.redis_url.as_deref().map(redact))
            .field("redis_tls", &self.redis_tls)
            .field("channel_prefix", &self.channel_prefix)
            .finish_non_exhaustive()
    }
}

/// Why a service could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// The Redis URL could not be parsed.
    InvalidRedisUrl(String),
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidRedisUrl(e) => write!(f, "invalid Redis URL: {e}"),
        }
    }
}

impl std::error::Error for BuildError {}

impl<H: MessageHandler> WebsocketServiceBuilder<H> {
    /// Number of shards. Default: the available parallelism. Each shard is a task owning its part
    /// of the topic map; more shards spread one publish's fan-out over more cores.
    pub fn shards(mut self, n: usize) -> Self {
        self.config.shards = n.max(1);
        self
    }

    /// The Redis URL to scale out with; `None` (the default) selects the in-process broker.
    ///
    /// One node: `redis://[user:password@]host[:port][/db]` (`rediss://` for TLS),
    /// `redis+unix:///path`; Sentinel: `redis+sentinel://host:port[,…]/service[/db]`; Redis
    /// Cluster with sharded Pub/Sub: `redis+cluster://[user:password@]host:port[,…]/` (seed
    /// nodes; `rediss+cluster://` for TLS), with `?partitions=N` (1 to 16 384, default 128):
    /// topics are spread over that many partitions, each pinned to one slot, and every instance
    /// of an application must use the same count. A URL that cannot be used is a
    /// [`BuildError`] at build time. See the scaling-out guide.
    pub fn redis_url(mut self, url: Option<impl Into<String>>) -> Self {
        self.redis_url = url.map(Into::into);
        self
    }

    /// TLS settings for a `rediss://` URL: a CA file instead of the platform's root
    /// certificates, a client certificate for mutual TLS. Without it, `rediss://` trusts the
    /// platform's roots. Files are read by [`build`](Self::build); a file that cannot be read
    /// or holds no usable certificate or key is a [`BuildError`].
    #[cfg(feature = "redis-tls")]
    pub fn redis_tls(mut self, tls: crate::RedisTls) -> Self {
        self.redis_tls = Some(tls);
        self
    }

    /// A prefix for Redis channel names: topic `general` is channel `<prefix>general`. Default:
    /// none, so any program can `PUBLISH general …` to reach the topic's subscribers. (On Redis
    /// Cluster the channel is `{<partition tag>}<prefix>general`.)
    pub fn channel_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.channel_prefix = prefix.into();
        self
    }

    /// Largest inbound message, in bytes: a single frame, or all fragments of one message together.
    /// A client that sends more is closed with 1009. Default: 64 KiB.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.config.max_message_size = bytes;
        self
    }

    /// Bound of each connection's outbound queue, in bytes: every data byte held for the
    /// connection counts, queued or taken by its writer and not yet written. Past it the
    /// [`slow_consumer_policy`](Self::slow_consumer_policy) acts; under the default `Close`, a
    /// client that stays over it for [`slow_consumer_grace`](Self::slow_consumer_grace) or would
    /// pass [`outbound_queue_ceiling_bytes`](Self::outbound_queue_ceiling_bytes) has its queue
    /// dropped and is closed with 1008. Default: 1 MiB.
    pub fn outbound_queue_bytes(mut self, bytes: usize) -> Self {
        self.config.outbound_queue_bytes = bytes;
        self
    }

    /// What a client that reads too slowly gets once its queue is full; see
    /// [`SlowConsumerPolicy`] (its `## Lagging` section says exactly what the client observes).
    /// Default: [`SlowConsumerPolicy::Close`].
    pub fn slow_consumer_policy(mut self, policy: SlowConsumerPolicy) -> Self {
        self.config.slow_consumer = policy;
        self
    }

    /// Under [`SlowConsumerPolicy::Close`], how long a connection may stay over its
    /// [`outbound_queue_bytes`](Self::outbound_queue_bytes) bound before it is closed with 1008.
    /// Default: 1 s.
    ///
    /// A burst larger than the bound (100 messages of 16 KB is 1.6 MB) goes over it even for a
    /// client that reads as fast as it can, until its socket buffers have grown; such a client
    /// drains it in milliseconds and is not a slow consumer. One that stays over for the whole
    /// grace is: the next message closes it, or, if none comes, its writer does once the grace
    /// is over. `ZERO` closes at the bound, as the bound alone did before.
    /// [`outbound_queue_ceiling_bytes`](Self::outbound_queue_ceiling_bytes) still caps what it
    /// holds meanwhile. `DropOldest` and `LatestPerTopic` act at the bound and ignore the grace.
    pub fn slow_consumer_grace(mut self, grace: Duration) -> Self {
        self.config.slow_consumer_grace = grace;
        self
    }

    /// Under [`SlowConsumerPolicy::Close`], the most data bytes a connection may hold, grace or
    /// not: a message that would take it past is refused and the connection closed with 1008 at
    /// once. Default: 4× [`outbound_queue_bytes`](Self::outbound_queue_bytes) (4 MiB); a value
    /// under the bound counts as the bound.
    ///
    /// Frames are shared `Bytes`: a broadcast burst queued to many lagging subscribers costs its
    /// size once, not once per subscriber, so the ceiling bounds the worst case (each connection
    /// holding different frames) rather than the common one.
    pub fn outbound_queue_ceiling_bytes(mut self, bytes: usize) -> Self {
        self.config.outbound_queue_ceiling = Some(bytes);
        self
    }

    /// A write to a client that makes no progress for this long closes the connection (a
    /// client that stopped reading with its TCP window shut). Default: 10 s.
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.config.write_timeout = timeout;
        self
    }

    /// The longest a connection's writer waits for more frames to share one write. Default:
    /// 20 ms.
    ///
    /// The wait is adaptive: a connection that wrote within the last 4 ms receives frames
    /// faster than 250 per second and waits, so the frames arriving meanwhile share one
    /// `writev`, and it keeps waiting while each write carries three frames or more and the
    /// next frame comes within the delay. One that has been quiet writes at once, so a chat
    /// message, a dashboard tick or a 60 Hz game update pays no delay: its shard writes a
    /// broadcast frame straight to the socket, without waking the connection's writer task.
    /// `ZERO` never waits and lets batches form only from what queues up while a write is in
    /// progress. For a busy connection the delay trades that much latency for far fewer
    /// syscalls per delivered message, which is what keeps a saturated core from queueing
    /// without bound. The measured trade-off (a fixed delay, the rules tried, why 20 ms, the
    /// shard's direct writes): docs/performance-notes.md#write-delay and
    /// docs/performance-notes.md#direct-writes.
    pub fn write_delay(mut self, delay: Duration) -> Self {
        self.config.write_delay = delay;
        self
    }

    /// How long a closing connection waits for the client's close frame. Default: 2 s.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.config.close_timeout = timeout;
        self
    }

    /// How long [`WebsocketService::shutdown`] waits for connections to end. Default: 5 s.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// Heartbeats: a client that sent nothing for `interval` is pinged, and closed if it then
    /// stays silent (no frame at all, pongs included) for `timeout` — a half-open TCP connection
    /// is found within `interval + timeout`. Default: 30 s and 30 s. `Duration::ZERO` as the
    /// interval disables heartbeats. Pings are control frames, sent ahead of queued data. A new
    /// connection's first ping is due between half an `interval` and one and a half after its
    /// upgrade, so clients that connect together are not pinged together.
    pub fn heartbeat(mut self, interval: Duration, timeout: Duration) -> Self {
        self.config.ping_interval = interval;
        self.config.pong_timeout = timeout;
        self
    }

    /// Longest topic name, in bytes; a longer one is refused with 400 before the upgrade.
    /// Default: 256. (Characters are always checked: printable ASCII without space, `"`, `\`,
    /// `*`, `?`, `[` or `]`; names starting with `__rtk` are the kit's own and refused.)
    pub fn max_topic_len(mut self, bytes: usize) -> Self {
        self.config.max_topic_len = bytes;
        self
    }

    /// Most connections open at once; further upgrades are refused with 503. Default: 100 000.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.config.max_connections = n;
        self
    }

    /// Per-connection inbound rate limit: `per_second` data messages on average, bursts up to
    /// `burst`. A message over the limit is dropped and the client gets one
    /// `{"type":"error",…}` per burst of drops; a client still over the limit after the grace
    /// period (3 s) is closed with 1008. Default: 1 000/s, bursts of 20 000. `None` disables it.
    pub fn rate_limit(mut self, limit: Option<(u32, u32)>) -> Self {
        self.config.rate_limit = limit.map(|(rate, burst)| (rate.max(1), burst.max(1)));
        self
    }

    /// How often the service reports its counters and gauges to the process's [`metrics`]
    /// recorder (whatever exporter the application installed: Prometheus, StatsD, …). Default:
    /// 1 s. `Duration::ZERO` stops the periodic report; [`WebsocketService::export_metrics`]
    /// still reports on demand. The hot path never calls the recorder: it counts in atomics,
    /// and this report copies them.
    pub fn metrics_interval(mut self, every: Duration) -> Self {
        self.config.metrics_interval = every;
        self
    }

    /// Adds a label to every metric this service reports, e.g. `("service", "chat")` when one
    /// process runs several services.
    pub fn metrics_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.metrics_labels.push((key.into(), value.into()));
        self
    }

    /// Builds and starts the service.
    pub fn try_build(self) -> Result<Arc<WebsocketService<H>>, BuildError> {
        let redis = self.redis_url.clone().map(|url| RedisSettings {
            url,
            prefix: self.channel_prefix.clone(),
            tls: self.redis_tls.clone(),
        });
        let runtime = Runtime::start(self.config, redis, self.policy).map_err(|e| {
            let url = self.redis_url.as_deref().unwrap_or_default();
            BuildError::InvalidRedisUrl(format!("{}: {e}", redact(url)))
        })?;
        Ok(Arc::new(WebsocketService {
            runtime,
            handler: self.handler,
            app_state: self.app_state,
            topic_rule: self.topic_rule,
            presence_user: self.presence_user,
        }))
    }

    /// Builds and starts the service.
    ///
    /// # Panics
    /// Where [`try_build`](Self::try_build) returns an error (an unusable Redis URL); call
    /// `try_build` to handle that as an error.
    pub fn build(self) -> Arc<WebsocketService<H>> {
        match self.try_build() {
            Ok(s) => s,
            Err(e) => panic!("axum-realtime-kit: {e}"),
        }
    }

    /// Which topics keep history, and how much: `rule` returns a topic's [`TopicPolicy`], or
    /// `None` for a topic that behaves exactly as without this rule (no positions, payloads
    /// verbatim). Default: no topic keeps history.
    ///
    /// It is asked whenever a topic without a stream is published to or subscribed to (so for
    /// every publication of a topic without a policy): keep it cheap, a match on the name. A
    /// topic's policy is fixed while its stream lives. With a rule set, each publish waits until
    /// the dispatcher has assigned its position (its place in the delivery order).
    ///
    /// Clients that open with `?proto=rtk1` (or the `rtk1` WebSocket subprotocol) then get each
    /// publication of such a topic with its position, and can reconnect with
    /// `&since=<offset>&epoch=<epoch>` to receive everything they missed (see the recovery
    /// guide). Clients that do not ask for `rtk1` receive the same verbatim frames as before.
    ///
    /// With Redis, Redis assigns the positions (the rule is then also asked on every publish):
    /// a publication of a positioned topic runs one script that takes the next offset, appends
    /// it to the topic's Redis stream and publishes it, and `publish` returns its position.
    /// Each instance recovers clients from the publications it received (see the recovery
    /// guide).
    pub fn topic_policy<F>(mut self, rule: F) -> Self
    where
        F: Fn(&str) -> Option<TopicPolicy> + Send + Sync + 'static,
    {
        self.policy = Some(Arc::new(rule));
        self
    }

    /// Most bytes of history kept over all topics; past it, the oldest publications of any
    /// topic are dropped first (a client that needed them gets `recovered: false`). Default:
    /// 64 MiB.
    pub fn history_max_bytes(mut self, bytes: usize) -> Self {
        self.config.history_max_bytes = bytes;
        self
    }

    /// Most publications one recovery re-sends; a client that missed more gets
    /// `recovered: false` and none of them. Default: 300. (Recoveries are also limited to half
    /// of [`outbound_queue_bytes`](Self::outbound_queue_bytes), so a recovery never meets the
    /// slow-consumer policy by itself.)
    pub fn recovery_max_publications(mut self, n: usize) -> Self {
        self.config.recovery_max_publications = n;
        self
    }

    /// The rule that authorises a topic an `rtk1` client asks to join with a
    /// `{"type":"subscribe","topic":…}` command: the same check your
    /// [`upgrade_handler`](crate::ws::upgrade::upgrade_handler) validator makes for the topic
    /// in the URL (pass the same function to both). Without it, subscribe commands are refused
    /// with an error message.
    pub fn authorize_topics<F, Fut>(mut self, rule: F) -> Self
    where
        F: Fn(Arc<H::AppState>, H::UserId, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StatusCode>> + Send + 'static,
    {
        self.topic_rule = Some(Arc::new(move |state, user, topic| {
            Box::pin(rule(state, user, topic))
        }));
        self
    }

    /// How a user appears in presence topics (see [`TopicPolicy::presence`]): `rule` turns the
    /// user given to [`upgrade_handler`](crate::ws::upgrade::upgrade_handler) into their
    /// presence id (connections with the same id are one user) and the info shown with them
    /// (JSON, e.g. a display name; the most recent connection's wins). Called once per
    /// connection, when a topic policy is set. Default: the user's `Debug` text, no info.
    pub fn presence_user<F>(mut self, rule: F) -> Self
    where
        F: Fn(&H::UserId) -> (String, serde_json::Value) + Send + Sync + 'static,
    {
        self.presence_user = Some(Arc::new(rule));
        self
    }

    /// With Redis: how often an instance renews its presence entries, and how long they outlive
    /// the last renewal. An instance that dies without a graceful shutdown has its users leave
    /// within `ttl` plus `refresh` (a live instance's renewal clears it). Default: 25 s and
    /// 60 s. `refresh` is capped at half of `ttl`.
    pub fn presence_timing(mut self, refresh: Duration, ttl: Duration) -> Self {
        let ttl = ttl.max(Duration::from_millis(100));
        self.config.presence_ttl = ttl;
        self.config.presence_refresh = refresh.min(ttl / 2).max(Duration::from_millis(10));
        self
    }

    /// How long a connection that dropped without a close (its TCP connection lost) still
    /// counts in presence: a client that reconnects within it causes no `leave` and `join`.
    /// A clean close and a graceful shutdown leave at once. Default: 5 s.
    pub fn presence_leave_grace(mut self, grace: Duration) -> Self {
        self.config.presence_grace = grace;
        self
    }

    /// Most topics one connection may be in at once, the one it opened with included. A
    /// [`WsSink::join`](crate::ws::types::WsSink::join) past it returns
    /// [`SendError::TooManyTopics`](crate::ws::types::SendError::TooManyTopics); leaving a topic
    /// makes room. The count is exact however many joins and leaves run at once. Default: 128
    /// (Centrifugo's default too); at least 1.
    pub fn max_topics_per_connection(mut self, n: usize) -> Self {
        self.config.max_topics_per_connection = n.max(1);
        self
    }

    /// Refuses, with `403 Forbidden` before the upgrade, a request whose `Origin` header is not
    /// one of `origins` (`scheme://host[:port]`, e.g. `"https://chat.example.com"`). This stops
    /// cross-site WebSocket hijacking: a page on another site opening a WebSocket to this server
    /// in the user's browser, which sends the user's cookies along. Default: no check.
    ///
    /// Browsers always send `Origin` on a WebSocket upgrade and scripts cannot change it;
    /// non-browser clients (servers, mobile apps, CLI tools) usually send none, and a request
    /// without `Origin` is let through: it cannot come from another site's page. So the check
    /// matters when your `TokenValidator` or upgrade validator authenticates with something the
    /// browser attaches by itself (a cookie, HTTP auth); with a token the page must put in the URL
    /// or a header, another site has no token to send.
    ///
    /// Origins are compared exactly, except that scheme and host are case-insensitive and a
    /// default port (`:80` for `http`, `:443` for `https`) or a trailing `/` is ignored:
    /// `https://example.com` does not allow `https://app.example.com` or `http://example.com`.
    /// An empty list refuses every request that has an `Origin`.
    pub fn allowed_origins<I, S>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let origins = origins
            .into_iter()
            .map(|o| crate::ws::upgrade::normalize_origin(o.as_ref()))
            .collect();
        self.config.allowed_origins = Some(origins);
        self
    }

    /// Accepts a client's `permessage-deflate` offer (RFC 7692), which every browser sends.
    /// Default: off.
    ///
    /// Each publication is compressed at most once per instance, the first time a subscriber
    /// that agreed to compression receives it, and that one compressed frame is shared by every
    /// such subscriber, as the plain frame is by the others: the cost is per publication, not
    /// per subscriber. Replies to one connection ([`WsSink`](crate::ws::types::WsSink)) are
    /// compressed for it. Messages under
    /// [`permessage_deflate_min_size`](Self::permessage_deflate_min_size) go uncompressed.
    /// Compressed client messages are inflated with
    /// [`max_message_size`](Self::max_message_size) applied to the inflated size.
    ///
    /// The server always asks for `server_no_context_takeover` and `client_no_context_takeover`:
    /// every message is compressed on its own, and a connection keeps no compression state while
    /// idle. Turn it on when egress or slow links cost more than a little CPU per publication;
    /// see the tuning guide (`docs/guides/tuning.md`) for what was measured.
    pub fn permessage_deflate(mut self, on: bool) -> Self {
        self.config.permessage_deflate = on;
        self
    }

    /// With [`permessage_deflate`](Self::permessage_deflate), messages shorter than `bytes` are
    /// sent uncompressed. Default: 256. Below that, JSON shrinks by a few bytes at most, and
    /// compressing a message costs about 10 µs whatever its size (measured:
    /// docs/performance-notes.md#deflate-threshold). 0 compresses every message.
    pub fn permessage_deflate_min_size(mut self, bytes: u32) -> Self {
        self.config.permessage_deflate_min_size = bytes;
        self
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_string(),
    }
}
