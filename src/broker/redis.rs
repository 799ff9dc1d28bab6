//! The Redis broker: instances share topics through Redis Pub/Sub.
//!
//! What follows describes one [`Node`]: a single server, Sentinel's primary, or one primary of
//! a Redis Cluster ([`super::cluster`]), where each primary has its own publisher, subscriber
//! (sharded Pub/Sub) and probe, and a topic's commands go to the primary of its partition.
//!
//! # Publishing
//! One long-lived connection ([`super::publisher`]): concurrent publishes are pipelined on it,
//! many to a write, and it is made again when it fails. Every publish is bounded by
//! [`PUBLISH_TIMEOUT`](super::publisher::PUBLISH_TIMEOUT), so while Redis is unreachable a caller gets an error within a second
//! instead of waiting or queuing.
//!
//! # Subscribing
//! One subscriber connection per instance, driven by our own small RESP2 reader so that
//! - it reads continuously into one buffer (Redis never drops it for a full output buffer while
//!   the dispatcher and shards keep up), and hands payloads on as `Bytes` slices of that buffer;
//! - its hand-off to the dispatcher is a bounded channel (redis-rs's pub/sub stream is unbounded);
//!   a publication of a topic without a policy skips the dispatcher: this task frames it and
//!   sends it to the shards' bounded channels itself ([`Fanout`]);
//! - subscriptions are reference-counted per instance (invariant 5, docs/architecture.md): a
//!   topic is SUBSCRIBEd when its first shard gains a subscriber and UNSUBSCRIBEd when its last
//!   shard loses one, changes coalesced into batched commands of at most [`BATCH`] channels;
//! - after a reconnect (capped exponential backoff with jitter) every live topic is re-subscribed
//!   in one pipelined write, and no client has to reconnect;
//! - a probe published on an instance-private channel every [`PROBE_INTERVAL`] must come back
//!   within [`PROBE_TIMEOUT`], or the connection is rebuilt: this catches a connection that is
//!   open but no longer delivering. Time the subscriber spends blocked handing messages to a
//!   dispatcher or shard that is behind does not count: it reads nothing then, so it could not
//!   see the probe's answer. The broker counts as live (readiness) only while probes come back,
//!   which proves the whole path: publisher → Redis → subscriber.
//!
//! A publish that fails fails alone as long as the publishing connection stays: Redis's error
//! reply, or a timeout on a connection that kept answering, leaves the others unaffected. Only a
//! failure that left no connection (it was lost and could not be made again, or went silent for
//! a caller's whole [`PUBLISH_TIMEOUT`](super::publisher::PUBLISH_TIMEOUT)) closes a gate: then
//! further publishes fail at once (no queuing, no waiting on reconnect attempts) until a probe
//! publish succeeds again. The first is tried [`PROBE_RETRY`] after the failure and again every
//! [`PROBE_RETRY`] until one succeeds, so the gate reopens within [`PROBE_RETRY`] of Redis
//! answering again.
//!
//! Delivery is at-most-once across an outage, like Redis Pub/Sub itself.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ahash::{AHashMap, AHashSet};
use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::cluster::{self, Cluster, Redirect};
use super::connect::{Addr, Target, connect, tls};
use super::positioned;
use super::presence;
use super::publisher::{PUBLISH_TIMEOUT, Publisher};
use super::resp::{self, Value};
use super::sentinel;
use super::stream::Stream;
use super::{PublishError, RedisSettings};
use crate::dispatch::{Fanout, Published};
use crate::history::{PolicyRule, Position, new_epoch};
use crate::metrics::Metrics;
use crate::presence::{Identity, PresencePage, PresenceStats};
use crate::shard::TopicInterest;
use crate::shrink::ShrinkWhenSparse;

/// Most channels in one SUBSCRIBE or UNSUBSCRIBE command.
pub(crate) const BATCH: usize = 512;
/// How often the subscriber's liveness probe is sent.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How soon a probe whose publish failed is tried again.
const PROBE_RETRY: Duration = Duration::from_millis(100);
/// How long a probe may take to come back before the connection is rebuilt.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for a new subscription's confirmation before a connection proceeds anyway.
pub(crate) const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A join waiting for its topic's confirmation; told `Err(Redis's error)` if Redis refused it.
type Waiter = oneshot::Sender<Result<(), Arc<str>>>;

/// Subscription bookkeeping shared by the shards (through [`TopicInterest`]), the connections
/// waiting for confirmation, and the subscriber tasks.
#[derive(Debug, Default)]
pub(crate) struct Interest {
    /// Topic → number of shards with at least one local subscriber. The keys are the topics this
    /// instance wants.
    pub(crate) counts: AHashMap<Arc<str>, usize>,
    /// Topics Redis confirmed on the current subscriber connection (of their node).
    confirmed: AHashSet<Arc<str>>,
    /// Connections waiting for a topic's confirmation: only joins under way (a waiter that times
    /// out removes itself; a topic no longer wanted takes its waiters with it).
    waiters: AHashMap<Arc<str>, Vec<Waiter>>,
    /// Topics Redis refused to subscribe (an ACL, say), with its error: their joins fail until
    /// the topic is no longer wanted, and the next join tries again.
    refused: AHashMap<Arc<str>, Arc<str>>,
}

/// One Redis server's connections: its pipelined publisher, and its subscriber's state as the
/// rest of the broker sees it. A single server (or Sentinel's primary) is one node; a cluster
/// has one per primary, made and dropped as the slot table changes.
pub(crate) struct Node {
    /// Where it is, for log lines and errors (no credentials).
    pub(crate) name: String,
    /// A cluster node's address (empty and 0 otherwise).
    pub(crate) host: String,
    pub(crate) port: u16,
    publisher: Arc<Publisher>,
    /// Whether the subscriber uses sharded Pub/Sub (`SSUBSCRIBE`, a cluster).
    sharded: bool,
    /// True while the last probe came back: publish → Redis → our subscriber connection works.
    pub(crate) live: AtomicBool,
    /// False after a publish failure left the publisher without a connection, until a probe
    /// publish succeeds again. While false, publishes fail at once instead of each waiting for a
    /// reconnect attempt.
    publisher_ok: AtomicBool,
    /// A task retries probe publishes every [`PROBE_RETRY`] to reopen `publisher_ok`.
    recovering: AtomicBool,
    /// Topics whose wanted state on this node changed since its subscriber last looked. Taken
    /// only while the interest lock is held (that lock first, then this one).
    dirty: Mutex<AHashSet<Arc<str>>>,
    /// Wakes the subscriber task when `dirty` gains a topic.
    pub(crate) wake: Notify,
    /// The subscriber connection is made again at once: the sentinels named a new primary, or
    /// the probe's channel changed.
    reconnect: Notify,
    /// Set when the node's tasks end (the service stops, or the node left the cluster).
    stopped: AtomicBool,
    stop: Notify,
    /// The channel the probe is published on: the instance's own, on one of the node's slots
    /// in a cluster. Read when the subscriber connects.
    probe: Mutex<Bytes>,
    /// The slot of `probe` in a cluster (`u16::MAX` before it has one).
    pub(crate) probe_slot: AtomicU16,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("live", &self.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Node {
    pub(crate) fn new(target: &Target, sharded: bool) -> Arc<Self> {
        let (host, port) = match &target.addr {
            Addr::Tcp { host, port } => (host.clone(), *port),
            _ => (String::new(), 0),
        };
        let publisher = Publisher::new(target.clone());
        let publisher = if sharded {
            publisher.sharded()
        } else {
            publisher
        };
        Arc::new(Self {
            name: target.to_string(),
            host,
            port,
            publisher: Arc::new(publisher),
            sharded,
            live: AtomicBool::new(false),
            publisher_ok: AtomicBool::new(true),
            recovering: AtomicBool::new(false),
            dirty: Mutex::default(),
            wake: Notify::new(),
            reconnect: Notify::new(),
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
            probe: Mutex::new(Bytes::new()),
            probe_slot: AtomicU16::new(u16::MAX),
        })
    }

    fn dirty(&self) -> MutexGuard<'_, AHashSet<Arc<str>>> {
        self.dirty.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that `topic`'s wanted state on this node changed (the caller holds the interest
    /// lock, and wakes the subscriber).
    pub(crate) fn mark(&self, topic: &Arc<str>) {
        self.dirty().insert(topic.clone());
    }

    /// Ends the node's subscriber and drops its publisher's connection.
    pub(crate) fn shut(&self) {
        self.stopped.store(true, Ordering::Release);
        self.stop.notify_one();
        self.publisher.reconnect();
    }

    fn probe_channel(&self) -> Bytes {
        self.probe.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Moves the probe to `channel`; a subscriber connected on the old one connects again.
    pub(crate) fn set_probe(&self, channel: Bytes) {
        let old = std::mem::replace(
            &mut *self.probe.lock().unwrap_or_else(|e| e.into_inner()),
            channel,
        );
        if !old.is_empty() {
            self.reconnect.notify_one();
        }
    }
}

/// A single server (or Sentinel's primary), or a cluster's primaries.
#[derive(Debug)]
enum Layout {
    Single(Arc<Node>),
    Cluster(Cluster),
}

#[derive(Debug)]
pub(crate) struct Shared {
    /// Guarded by a std mutex: held for map updates only, never across an await.
    interest: Mutex<Interest>,
    /// `<prefix>` prepended to every topic to form the channel name.
    prefix: String,
    /// Set when the service is dropped; the subscriber tasks then end.
    pub(crate) stopped: AtomicBool,
    /// Where the subscriber hands presence events (`join`/`leave` of a topic), once presence
    /// is wired ([`RedisBroker::on_presence`]).
    presence_events: std::sync::OnceLock<mpsc::Sender<(Arc<str>, Bytes)>>,
    /// Delivers publications of topics without a policy straight to the shards.
    fanout: std::sync::OnceLock<Fanout>,
    /// This instance's id in presence keys.
    instance: String,
    layout: Layout,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Interest> {
        self.interest.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn cluster(&self) -> Option<&Cluster> {
        match &self.layout {
            Layout::Cluster(c) => Some(c),
            Layout::Single(_) => None,
        }
    }

    /// The node that serves `topic` now (none while a cluster's table lacks its slot).
    fn owner(&self, topic: &str) -> Option<Arc<Node>> {
        match &self.layout {
            Layout::Single(node) => Some(node.clone()),
            Layout::Cluster(c) => c.node_of(topic).0,
        }
    }

    /// Whether `node` serves `topic` now.
    fn owns(&self, node: &Arc<Node>, topic: &str) -> bool {
        match &self.layout {
            Layout::Single(_) => true,
            Layout::Cluster(c) => c.node_of(topic).0.is_some_and(|n| Arc::ptr_eq(&n, node)),
        }
    }

    /// `topic`'s partition (a cluster's; 0 otherwise).
    fn partition(&self, topic: &str) -> u16 {
        self.cluster().map_or(0, |c| c.partitions.of(topic))
    }

    /// The channel of `topic`: `<prefix><topic>`, on a cluster `{<tag>}<prefix><topic>`.
    fn channel(&self, topic: &str) -> Bytes {
        let tag = self
            .cluster()
            .map(|c| c.partitions.tag(c.partitions.of(topic)));
        let mut channel = BytesMut::with_capacity(
            self.prefix.len() + topic.len() + tag.map_or(0, |t| t.len() + 2),
        );
        if let Some(tag) = tag {
            channel.extend_from_slice(b"{");
            channel.extend_from_slice(tag.as_bytes());
            channel.extend_from_slice(b"}");
        }
        channel.extend_from_slice(self.prefix.as_bytes());
        channel.extend_from_slice(topic.as_bytes());
        channel.freeze()
    }

    /// What `topic`'s keys start with, hash tag included: `{<prefix><topic>}`, on a cluster
    /// `{<tag>}<prefix><topic>` (its channel).
    fn key_tag(&self, topic: &str) -> String {
        match self.cluster() {
            None => format!("{{{}{topic}}}", self.prefix),
            Some(c) => format!(
                "{{{}}}{}{topic}",
                c.partitions.tag(c.partitions.of(topic)),
                self.prefix
            ),
        }
    }

    /// The topic named by a channel (no allocation).
    fn topic_name<'a>(&self, channel: &'a [u8]) -> Option<&'a str> {
        let channel = if self.cluster().is_some() {
            let rest = channel.strip_prefix(b"{")?;
            &rest[rest.iter().position(|&b| b == b'}')? + 1..]
        } else {
            channel
        };
        std::str::from_utf8(channel.strip_prefix(self.prefix.as_bytes())?).ok()
    }

    /// A cluster node's probe channel, on `slot`.
    pub(crate) fn probe_channel(&self, slot: u16) -> Bytes {
        Bytes::from(format!(
            "{{{}}}{}__rtk_probe:{}",
            super::slots::tag_of_slot(slot),
            self.prefix,
            self.instance
        ))
    }

    /// `topics` were not subscribed where they were sent (a cluster's slot moved): once the
    /// slot table was read again, each still wanted is marked on the node that serves it.
    fn displaced(self: &Arc<Self>, topics: Vec<Arc<str>>) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        cluster.refresh_soon();
        let shared = self.clone();
        tokio::spawn(async move {
            if let Some(c) = shared.cluster() {
                c.refreshed(Duration::from_secs(2)).await;
            }
            let st = shared.lock();
            let mut woken = Vec::new();
            for t in topics {
                if !st.counts.contains_key(&t) {
                    continue;
                }
                if let Some(node) = shared.owner(&t) {
                    node.mark(&t);
                    woken.push(node);
                }
            }
            drop(st);
            for node in woken {
                node.wake.notify_one();
            }
        });
    }
}

impl TopicInterest for Shared {
    fn first_in_shard(&self, topic: &Arc<str>) {
        let mut st = self.lock();
        let n = st.counts.entry(topic.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            // A cluster's table not read yet: the first table marks every wanted topic.
            if let Some(node) = self.owner(topic) {
                node.mark(topic);
                drop(st);
                node.wake.notify_one();
            }
        }
    }

    fn last_in_shard(&self, topic: &Arc<str>) {
        let mut st = self.lock();
        let Some(n) = st.counts.get_mut(topic) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            st.counts.remove(topic);
            st.counts.shrink_when_sparse();
            // Whoever waited for this topic has left it: the waiters go now, not at the next
            // reconcile, which does not run while Redis is unreachable.
            if st.waiters.remove(topic).is_some() {
                st.waiters.shrink_when_sparse();
            }
            if st.refused.remove(topic).is_some() {
                st.refused.shrink_when_sparse();
            }
            if let Some(node) = self.owner(topic) {
                node.mark(topic);
                drop(st);
                node.wake.notify_one();
            }
        }
    }
}

/// The scripts: on a cluster they publish with `SPUBLISH`.
#[derive(Debug)]
struct Scripts {
    position: Script,
    read: Script,
    end_epoch: Script,
    presence: Script,
}

/// A Lua script's text, and its SHA once `SCRIPT LOAD` gave it: called by SHA, the text
/// travels and is hashed only when a server lacks it.
#[derive(Debug)]
struct Script {
    text: Bytes,
    sha: Mutex<Option<Bytes>>,
}

impl Scripts {
    fn new(sharded: bool) -> Self {
        let script = |s: &'static str| Script {
            text: if sharded {
                Bytes::from(s.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'"))
            } else {
                Bytes::from_static(s.as_bytes())
            },
            sha: Mutex::new(None),
        };
        Self {
            position: script(positioned::SCRIPT),
            read: script(positioned::READ_SCRIPT),
            end_epoch: script(positioned::END_EPOCH_SCRIPT),
            presence: script(presence::SCRIPT),
        }
    }
}

/// The Redis side of one instance.
#[derive(Clone)]
pub(crate) struct RedisBroker {
    shared: Arc<Shared>,
    /// Through Sentinel: the task that follows failovers ([`sentinel::watch`]); on a cluster,
    /// the task that keeps the slot table ([`cluster::keep`]).
    watcher: Option<Arc<tokio::task::JoinHandle<()>>>,
    /// Which topics are positioned: their publications go through [`positioned::SCRIPT`].
    rule: Option<PolicyRule>,
    scripts: Arc<Scripts>,
    /// How long this instance's presence entries outlive their last renewal.
    presence_ttl: Duration,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("live", &self.is_live())
            .field("prefix", &self.shared.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Validates the URL, creates the (lazy) publisher and spawns the subscriber task (on a
    /// cluster, the task that reads the slot table and starts each primary's). Nothing here
    /// waits for Redis: an instance starts, unready, while Redis is down.
    pub(crate) fn start(
        settings: RedisSettings,
        instance: u64,
        dispatch: mpsc::Sender<Published>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let RedisSettings { url, prefix, tls } = settings;
        let (layout, single) = match cluster::Spec::from_url(&url) {
            Some(spec) => {
                let spec = spec?;
                let mut template = Target::from_url(&spec.node_url, None)?;
                if spec.tls {
                    template.tls = Some(tls::Client::new(None, tls.as_ref())?);
                }
                (Layout::Cluster(Cluster::new(&spec, template)?), None)
            }
            None => {
                let target = Target::from_url(&url, tls.as_ref())?;
                let node = Node::new(&target, false);
                node.set_probe(Bytes::from(format!("{prefix}__rtk_probe:{instance:016x}")));
                (Layout::Single(node.clone()), Some((node, target)))
            }
        };
        let sharded = matches!(layout, Layout::Cluster(_));
        let shared = Arc::new(Shared {
            interest: Mutex::new(Interest::default()),
            prefix,
            stopped: AtomicBool::new(false),
            presence_events: std::sync::OnceLock::new(),
            fanout: std::sync::OnceLock::new(),
            instance: format!("{instance:016x}"),
            layout,
        });
        let watcher = match single {
            Some((node, target)) => {
                let watcher = matches!(target.addr, Addr::Sentinel(_)).then(|| {
                    let node = node.clone();
                    Arc::new(tokio::spawn(sentinel::watch(target.clone(), move || {
                        node.publisher.reconnect();
                        node.reconnect.notify_one();
                    })))
                });
                let task = Subscriber::new(shared.clone(), node, target, dispatch, metrics);
                tokio::spawn(task.run());
                watcher
            }
            None => {
                let spawner = shared.clone();
                let spawn = move |node: &Arc<Node>, target: Target| {
                    let task = Subscriber::new(
                        spawner.clone(),
                        node.clone(),
                        target,
                        dispatch.clone(),
                        metrics.clone(),
                    );
                    tokio::spawn(task.run());
                };
                Some(Arc::new(tokio::spawn(cluster::keep(shared.clone(), spawn))))
            }
        };
        Ok(Self {
            shared,
            watcher,
            rule: None,
            scripts: Arc::new(Scripts::new(sharded)),
            presence_ttl: Duration::from_secs(60),
        })
    }

    /// Presence entries of this instance expire `ttl` after their last renewal.
    pub(crate) fn presence_ttl(mut self, ttl: Duration) -> Self {
        self.presence_ttl = ttl;
        self
    }

    /// Gives topics that `rule` gives a policy positions assigned by Redis.
    pub(crate) fn positioned(mut self, rule: Option<PolicyRule>) -> Self {
        self.rule = rule;
        self
    }

    /// Runs `op` on the node that serves `topic`, given that node and whether to send `ASKING`
    /// first. With `gate`, fails at once while that node's publisher is known to be down, and
    /// closes the gate when a failure left it without a connection.
    ///
    /// On a cluster, a command answered `MOVED` did not run: the slot table is read again and
    /// the command sent once more to the node it names. One answered `ASK` is sent once to the
    /// node named, behind `ASKING`, and the table stays. A failure names the node and the
    /// topic's partition.
    async fn on_node<T, F, Fut>(&self, topic: &str, gate: bool, op: F) -> Result<T, PublishError>
    where
        F: Fn(Arc<Node>, bool) -> Fut,
        Fut: Future<Output = Result<T, PublishError>>,
    {
        let node = match &self.shared.layout {
            Layout::Single(node) => return self.gated(node.clone(), gate, &op, false).await,
            Layout::Cluster(c) => c.node_of(topic),
        };
        let cluster = self.shared.cluster().expect("a cluster");
        let partition = node.1;
        let unserved = || {
            PublishError::Unavailable(format!(
                "no Redis Cluster primary serves partition {partition} (slot {}) now",
                cluster.partitions.slot(partition)
            ))
        };
        let mut node = node.0.ok_or_else(unserved)?;
        let mut res = self.gated(node.clone(), gate, &op, false).await;
        if let Err(PublishError::Unavailable(e)) = &res {
            match Redirect::parse(e) {
                Some(Redirect::Moved { .. }) => {
                    cluster.refreshed(PUBLISH_TIMEOUT).await;
                    node = cluster.node_of(topic).0.ok_or_else(unserved)?;
                    res = self.gated(node.clone(), gate, &op, false).await;
                }
                Some(Redirect::Ask { node: to, .. }) => {
                    let table = cluster.table();
                    let named = table.nodes.iter().find(|n| {
                        let port = n.port.to_string();
                        to == format!("{}:{port}", n.host) || to == format!(":{port}")
                    });
                    if let Some(n) = named {
                        node = n.clone();
                        res = self.gated(node.clone(), gate, &op, true).await;
                    }
                }
                None => {}
            }
        }
        res.map_err(|e| match e {
            PublishError::Unavailable(e) => PublishError::Unavailable(format!(
                "Redis Cluster node {} (partition {partition}): {e}",
                node.name
            )),
            other => other,
        })
    }

    async fn gated<T, F, Fut>(
        &self,
        node: Arc<Node>,
        gate: bool,
        op: &F,
        asking: bool,
    ) -> Result<T, PublishError>
    where
        F: Fn(Arc<Node>, bool) -> Fut,
        Fut: Future<Output = Result<T, PublishError>>,
    {
        if gate && !node.publisher_ok.load(Ordering::Acquire) {
            return Err(PublishError::Unavailable(
                "Redis unreachable; reconnecting".into(),
            ));
        }
        let res = op(node.clone(), asking).await;
        if gate && res.is_err() && node.publisher.link_down() {
            node.publisher_ok.store(false, Ordering::Release);
            self.recover(&node);
        }
        res
    }

    /// Publishes `payload` on `topic`: through the position script if the topic has a policy
    /// (returning its position), with a plain PUBLISH otherwise.
    pub(crate) async fn publish_at(
        &self,
        topic: &str,
        payload: Bytes,
    ) -> Result<Option<Position>, PublishError> {
        let Some(policy) = self.rule.as_ref().and_then(|rule| rule(topic)) else {
            return self.publish(topic, payload).await.map(|()| None);
        };
        let channel = self.shared.channel(topic);
        let args = positioned::args(
            &self.shared.key_tag(topic),
            channel,
            payload,
            &policy,
            &new_epoch(),
        );
        let value = self
            .on_node(topic, true, |node, asking| {
                // Not resent: a script that ran but whose answer was lost must not run again,
                // or the publication would get two offsets.
                let script = &self.scripts.position;
                self.run_script(node, script, args.clone(), false, asking)
            })
            .await?;
        match positioned::reply_position(&value) {
            Some(p) => Ok(Some(p)),
            None => Err(PublishError::Unavailable(format!(
                "unexpected reply to the position script: {value:?}"
            ))),
        }
    }

    /// Runs `script` with `args` on the node of `topic`, like [`call`](Self::call).
    async fn call_script(
        &self,
        topic: &str,
        script: &Script,
        args: Vec<Bytes>,
    ) -> Result<Value, PublishError> {
        self.on_node(topic, false, |node, asking| {
            self.run_script(node, script, args.clone(), true, asking)
        })
        .await
    }

    /// Sends `cmd` to the node of `topic` (see [`on_node`](Self::on_node)), without the gate.
    async fn call(&self, topic: &str, cmd: Vec<Bytes>) -> Result<Value, PublishError> {
        self.on_node(topic, false, |node, asking| {
            let cmd = cmd.clone();
            async move { node.publisher.call_with(cmd, true, asking).await }
        })
        .await
    }

    /// Reads the publications `from ..= to` of `topic` from its Redis stream, with the
    /// stream's epoch.
    pub(crate) async fn read_range(
        &self,
        topic: &str,
        from: u64,
        to: u64,
    ) -> Result<(String, Vec<(u64, Bytes)>), String> {
        let (meta, stream) = positioned::keys(&self.shared.key_tag(topic));
        let args = vec![
            Bytes::from_static(b"2"),
            meta,
            stream,
            Bytes::from(format!("{from}-0")),
            Bytes::from(format!("{to}-0")),
        ];
        let value = self
            .call_script(topic, &self.scripts.read, args)
            .await
            .map_err(|e| e.to_string())?;
        positioned::read_reply(value).ok_or_else(|| "unexpected reply reading history".into())
    }

    /// Ends `topic`'s epoch in Redis if it is still `epoch` (its stream went back after a
    /// failover): the next publication starts a new one. Whether it was still current.
    pub(crate) async fn end_epoch(&self, topic: &str, epoch: &str) -> Result<bool, PublishError> {
        let (meta, stream) = positioned::keys(&self.shared.key_tag(topic));
        let args = vec![
            Bytes::from_static(b"2"),
            meta,
            stream,
            Bytes::copy_from_slice(epoch.as_bytes()),
        ];
        match self
            .call_script(topic, &self.scripts.end_epoch, args)
            .await?
        {
            Value::Int(n) => Ok(n == 1),
            other => Err(PublishError::Unavailable(format!(
                "unexpected reply ending an epoch: {other:?}"
            ))),
        }
    }

    /// Deletes `topic`'s stream and meta keys: the next publication starts a new epoch at
    /// offset 1, on every instance. Whether there was anything to delete.
    pub(crate) async fn remove_stream(&self, topic: &str) -> Result<bool, PublishError> {
        let (meta, stream) = positioned::keys(&self.shared.key_tag(topic));
        let cmd = vec![Bytes::from_static(b"DEL"), meta, stream];
        match self.call(topic, cmd).await? {
            Value::Int(n) => Ok(n > 0),
            other => Err(PublishError::Unavailable(format!(
                "unexpected reply to DEL: {other:?}"
            ))),
        }
    }

    /// `script` by EVALSHA with `args` on `node`; on NOSCRIPT (a restarted or flushed Redis, or
    /// a cluster node that has not run it yet), EVAL, which loads it again. `resend`: whether
    /// the call may be sent again after a lost connection (see [`Publisher::call_with`]).
    async fn run_script(
        &self,
        node: Arc<Node>,
        script: &Script,
        args: Vec<Bytes>,
        resend: bool,
        asking: bool,
    ) -> Result<Value, PublishError> {
        let cached = script.sha.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sha = match cached {
            Some(sha) => sha,
            None => {
                let load = vec![
                    Bytes::from_static(b"SCRIPT"),
                    Bytes::from_static(b"LOAD"),
                    script.text.clone(),
                ];
                match node.publisher.call(load).await? {
                    Value::Bulk(Some(sha)) => {
                        *script.sha.lock().unwrap_or_else(|e| e.into_inner()) = Some(sha.clone());
                        sha
                    }
                    other => {
                        return Err(PublishError::Unavailable(format!(
                            "unexpected reply to SCRIPT LOAD: {other:?}"
                        )));
                    }
                }
            }
        };
        let mut cmd = Vec::with_capacity(args.len() + 2);
        cmd.push(Bytes::from_static(b"EVALSHA"));
        cmd.push(sha);
        cmd.extend(args.iter().cloned());
        let node = &node;
        let call = |cmd| node.publisher.call_with(cmd, resend, asking);
        match call(cmd).await {
            Err(PublishError::Unavailable(e)) if e.starts_with("NOSCRIPT") => {
                let mut cmd = Vec::with_capacity(args.len() + 2);
                cmd.push(Bytes::from_static(b"EVAL"));
                cmd.push(script.text.clone());
                cmd.extend(args);
                call(cmd).await
            }
            other => other,
        }
    }

    pub(crate) async fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PublishError> {
        let channel = self.shared.channel(topic);
        self.on_node(topic, true, |node, asking| {
            let (channel, payload) = (channel.clone(), payload.clone());
            async move {
                if asking {
                    let verb = Bytes::from_static(node.publisher.verb());
                    let cmd = vec![verb, channel, payload];
                    node.publisher.call_with(cmd, true, true).await.map(drop)
                } else {
                    node.publisher.publish(channel, payload).await
                }
            }
        })
        .await
    }

    /// Unless a recovery already runs: tries a probe publish every [`PROBE_RETRY`] until one
    /// succeeds, then reopens `publisher_ok` of `node`.
    fn recover(&self, node: &Arc<Node>) {
        if node.recovering.swap(true, Ordering::AcqRel) {
            return;
        }
        let (node, shared) = (node.clone(), self.shared.clone());
        tokio::spawn(async move {
            loop {
                // Not `stop.notified()`: its one permit is the subscriber task's.
                tokio::time::sleep(PROBE_RETRY).await;
                if shared.stopped.load(Ordering::Acquire)
                    || node.stopped.load(Ordering::Acquire)
                    || node.publisher_ok.load(Ordering::Acquire)
                {
                    break;
                }
                let probe = Bytes::from_static(b"probe");
                if node
                    .publisher
                    .publish(node.probe_channel(), probe)
                    .await
                    .is_ok()
                {
                    node.publisher_ok.store(true, Ordering::Release);
                    break;
                }
            }
            node.recovering.store(false, Ordering::Release);
        });
    }

    /// Hands the presence events the subscriber receives to `events` (bounded; an event that
    /// finds it full is dropped: `join`/`leave` are at most once).
    pub(crate) fn on_presence(&self, events: mpsc::Sender<(Arc<str>, Bytes)>) {
        let _ = self.shared.presence_events.set(events);
    }

    /// The subscriber tasks deliver publications of topics without a policy with `fanout`
    /// themselves; the others still go to the dispatcher. Set before any topic is subscribed.
    pub(crate) fn deliver_with(&self, fanout: Fanout) {
        let _ = self.shared.fanout.set(fanout);
    }

    /// Runs the presence script on `topic`: `op` and its arguments.
    async fn presence_call(
        &self,
        topic: &str,
        op: &'static str,
        args: Vec<Bytes>,
    ) -> Result<Value, String> {
        let ttl = self.presence_ttl.as_millis().max(1);
        let mut script_args = Vec::with_capacity(10 + args.len());
        script_args.push(Bytes::from_static(b"5"));
        script_args.extend(presence::keys(
            &self.shared.key_tag(topic),
            &self.shared.instance,
        ));
        script_args.push(Bytes::from_static(op.as_bytes()));
        script_args.push(self.shared.channel(topic));
        script_args.push(Bytes::from(self.shared.instance.clone()));
        script_args.push(Bytes::from(ttl.to_string()));
        script_args.extend(args);
        self.call_script(topic, &self.scripts.presence, script_args)
            .await
            .map_err(|e| e.to_string())
    }

    /// Adds connection `conn` of `who` to `topic`'s presence.
    pub(crate) async fn presence_add(
        &self,
        topic: &str,
        conn: uuid::Uuid,
        who: &Identity,
    ) -> Result<(), String> {
        let args = vec![
            Bytes::from(conn.simple().to_string()),
            Bytes::copy_from_slice(who.user.as_bytes()),
            Bytes::copy_from_slice(who.info.as_bytes()),
        ];
        self.presence_call(topic, "add", args).await.map(drop)
    }

    /// Removes connection `conn` from `topic`'s presence.
    pub(crate) async fn presence_remove(
        &self,
        topic: &str,
        conn: uuid::Uuid,
    ) -> Result<(), String> {
        let args = vec![Bytes::from(conn.simple().to_string())];
        self.presence_call(topic, "rem", args).await.map(drop)
    }

    /// Renews this instance's entries of `topic`; `false` if Redis holds fewer than `count`.
    pub(crate) async fn presence_refresh(&self, topic: &str, count: usize) -> Result<bool, String> {
        let args = vec![Bytes::from(count.to_string())];
        match self.presence_call(topic, "refresh", args).await? {
            Value::Int(n) => Ok(n == 1),
            other => Err(format!("unexpected reply to a presence refresh: {other:?}")),
        }
    }

    /// Removes every entry of this instance from `topic`'s presence.
    pub(crate) async fn presence_drop(&self, topic: &str) -> Result<(), String> {
        self.presence_call(topic, "drop", Vec::new())
            .await
            .map(drop)
    }

    /// About `limit` users of `topic` from `cursor` on.
    pub(crate) async fn presence_list(
        &self,
        topic: &str,
        cursor: &str,
        limit: usize,
    ) -> Result<PresencePage, String> {
        let args = vec![
            Bytes::copy_from_slice(cursor.as_bytes()),
            Bytes::from(limit.to_string()),
        ];
        let v = self.presence_call(topic, "list", args).await?;
        presence::list_reply(v).ok_or_else(|| "unexpected reply listing presence".into())
    }

    /// `topic`'s user and connection counts.
    pub(crate) async fn presence_stats(&self, topic: &str) -> Result<PresenceStats, String> {
        let v = self.presence_call(topic, "stats", Vec::new()).await?;
        presence::stats_reply(&v)
            .ok_or_else(|| format!("unexpected reply to presence stats: {v:?}"))
    }

    /// Ends the subscriber tasks (the service is going away).
    pub(crate) fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        if let Some(watcher) = &self.watcher {
            watcher.abort();
        }
        match &self.shared.layout {
            Layout::Single(node) => node.stop.notify_one(),
            Layout::Cluster(c) => {
                for node in &c.table().nodes {
                    node.shut();
                }
            }
        }
    }

    /// Whether publishes reach every subscriber connection: the node's probe comes back; on a
    /// cluster, every slot of a partition has a primary and every primary's probe comes back.
    pub(crate) fn is_live(&self) -> bool {
        match &self.shared.layout {
            Layout::Single(node) => node.live.load(Ordering::Acquire),
            Layout::Cluster(c) => c.is_live(),
        }
    }

    pub(crate) fn interest(&self) -> Arc<dyn TopicInterest> {
        self.shared.clone()
    }

    /// Resolves once Redis confirmed `topic` on the subscriber connection, or after
    /// [`SUBSCRIBE_WAIT`] (Redis down: the connection proceeds and is covered by the
    /// re-subscription once Redis is back). A waiter that gives up removes its entry, so the
    /// waiters are never more than the joins under way. `Err` carries Redis's error when it
    /// refused the subscription (an ACL that forbids the channel, say).
    pub(crate) async fn wait_subscribed(&self, topic: &str) -> Result<(), String> {
        let rx = {
            let mut st = self.shared.lock();
            if st.confirmed.contains(topic) {
                return Ok(());
            }
            if let Some(why) = st.refused.get(topic) {
                return Err(why.to_string());
            }
            let Some((key, _)) = st.counts.get_key_value(topic) else {
                return Ok(());
            };
            let key = key.clone();
            let (tx, rx) = oneshot::channel();
            st.waiters.entry(key).or_default().push(tx);
            rx
        };
        let answer = tokio::time::timeout(SUBSCRIBE_WAIT, rx).await;
        if let Ok(Ok(Err(why))) = answer {
            return Err(why.to_string());
        }
        if answer.is_err() {
            // Timed out: this waiter's receiver is gone; prune every closed one of the topic.
            let mut st = self.shared.lock();
            if let Some(list) = st.waiters.get_mut(topic) {
                list.retain(|w| !w.is_closed());
                if list.is_empty() {
                    st.waiters.remove(topic);
                    st.waiters.shrink_when_sparse();
                }
            }
        }
        Ok(())
    }
}

/// Why a subscriber connection was given up.
#[derive(Debug)]
enum Lost {
    Io(std::io::Error),
    Protocol(String),
    ProbeTimeout,
    Failover,
    Shutdown,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "i/o: {e}"),
            Self::Protocol(e) => write!(f, "protocol: {e}"),
            Self::ProbeTimeout => {
                write!(f, "liveness probe not delivered within {PROBE_TIMEOUT:?}")
            }
            Self::Failover => {
                f.write_str("told to reconnect (a new primary, or the probe's slot moved)")
            }
            Self::Shutdown => f.write_str("shutdown"),
        }
    }
}

/// The subscriber connection of one node: all of a single server's topics, or on a cluster the
/// topics whose partitions that primary serves.
struct Subscriber {
    shared: Arc<Shared>,
    node: Arc<Node>,
    target: Target,
    dispatch: mpsc::Sender<Published>,
    /// The probe channel of the current connection.
    probe_channel: Bytes,
    /// Topics subscribed (or being subscribed) on the current connection.
    actual: AHashSet<Arc<str>>,
    /// Commands sent whose replies have not all arrived, oldest first: Redis answers a SUBSCRIBE
    /// or UNSUBSCRIBE with one reply per channel, or refuses the whole command with one error.
    sent: VecDeque<Sent>,
    /// Topics of a refused batch, to be subscribed one per command to find the refused ones.
    resend: Vec<Arc<str>>,
    /// SUBSCRIBE commands sent per topic whose acknowledgement has not arrived yet, kept for a
    /// topic left meanwhile too, until its acknowledgements are in.
    pending_acks: AHashMap<Arc<str>, u32>,
    /// SUNSUBSCRIBE commands sent per topic whose acknowledgement has not arrived yet: a
    /// `sunsubscribe` of a topic without one is the server's own (its slot moved).
    pending_unsubs: AHashMap<Arc<str>, u32>,
    /// Topics whose slot turned out to live elsewhere, handed on together once the values read
    /// so far are handled (a slot that moves ends all of its subscriptions at once).
    moved: Vec<Arc<str>>,
    /// This task's copy of [`Shared::fanout`], once set.
    fanout: Option<Fanout>,
    metrics: Arc<Metrics>,
}

impl Subscriber {
    fn new(
        shared: Arc<Shared>,
        node: Arc<Node>,
        target: Target,
        dispatch: mpsc::Sender<Published>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            shared,
            node,
            target,
            dispatch,
            probe_channel: Bytes::new(),
            actual: AHashSet::new(),
            sent: VecDeque::new(),
            resend: Vec::new(),
            pending_acks: AHashMap::new(),
            pending_unsubs: AHashMap::new(),
            moved: Vec::new(),
            fanout: None,
            metrics,
        }
    }

    fn stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire) || self.node.stopped.load(Ordering::Acquire)
    }

    async fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            if self.stopped() {
                return;
            }
            let lost = match connect(&self.target).await {
                Ok(stream) => {
                    let lost = self.serve(stream, &mut failures).await;
                    if matches!(lost, Lost::Shutdown) {
                        return;
                    }
                    lost
                }
                Err(e) => Lost::Io(e),
            };
            self.node.live.store(false, Ordering::Release);
            if self.stopped() {
                return;
            }
            self.metrics.broker_reconnect();
            if let Some(cluster) = self.shared.cluster() {
                // The node may have failed over or left: read the slot table again.
                cluster.refresh_soon();
            }
            {
                let mut st = self.shared.lock();
                // Confirmed topics are all subscribed on this connection (on a cluster, other
                // nodes' stay confirmed).
                st.confirmed.retain(|t| !self.actual.contains(t));
                // The next connection tries refused topics again (the ACL may have changed).
                let shared = &self.shared;
                let node = &self.node;
                st.refused.retain(|t, _| !shared.owns(node, t));
            }
            self.actual.clear();
            self.sent.clear();
            self.resend.clear();
            self.pending_acks.clear();
            self.pending_unsubs.clear();
            if !self.moved.is_empty() {
                self.shared.displaced(std::mem::take(&mut self.moved));
            }
            // A new primary named by the sentinels is connected to at once, whatever the
            // failures before it; so is one named while this waits out a backoff.
            let delay = if matches!(lost, Lost::Failover) {
                failures = 0;
                Duration::ZERO
            } else {
                failures = failures.saturating_add(1);
                backoff(failures)
            };
            tracing::warn!(node = %self.node.name, error = %lost, retry_in = ?delay, "redis subscriber connection lost");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.node.reconnect.notified() => failures = 0,
                _ = self.node.stop.notified() => return,
            }
        }
    }

    /// Runs one connection until it is lost.
    async fn serve(&mut self, mut stream: Stream, failures: &mut u32) -> Lost {
        // Re-subscribe everything wanted, the probe channel first, in one pipelined write.
        let wanted: Vec<Arc<str>> = {
            let st = self.shared.lock();
            self.node.dirty().clear();
            st.counts
                .keys()
                .filter(|t| self.shared.owns(&self.node, t))
                .cloned()
                .collect()
        };
        self.probe_channel = self.node.probe_channel();
        let mut out = Vec::new();
        let verb: &[u8] = if self.node.sharded {
            b"SSUBSCRIBE"
        } else {
            b"SUBSCRIBE"
        };
        resp::encode_command(&mut out, [verb, &self.probe_channel].into_iter());
        self.sent.push_back(Sent {
            topics: None,
            subscribe: true,
            replies: 1,
        });
        self.subscribe_cmds(&mut out, wanted);
        if let Err(e) = send(&mut stream, &out).await {
            return Lost::Io(e);
        }

        let mut buf = BytesMut::with_capacity(64 * 1024);
        let mut probe = Probe::new();
        let (probe_tx, mut probe_failed) = mpsc::channel::<()>(4);
        let mut tick = tokio::time::interval(PROBE_RETRY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The rare wake-ups stay armed from one read to the next. A `Notified` joins its
        // `Notify`'s list of waiters when first polled and leaves it when dropped, each under
        // the `Notify`'s lock: armed anew for every read, the four of them cost more than the
        // read of a small publication.
        let (node, dispatch) = (self.node.clone(), self.dispatch.clone());
        let mut wake = std::pin::pin!(node.wake.notified());
        let mut reconnect = std::pin::pin!(node.reconnect.notified());
        let mut stop = std::pin::pin!(node.stop.notified());
        let mut closed = std::pin::pin!(dispatch.closed());
        loop {
            // Everything complete in the buffer first.
            loop {
                match resp::parse(&mut buf) {
                    Ok(Some(v)) => {
                        if let Err(lost) = self.handle(v, &mut probe, failures).await {
                            return lost;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Lost::Protocol(e.to_string()),
                }
            }
            if !self.moved.is_empty() {
                tracing::info!(node = %self.node.name, topics = self.moved.len(), "redis cluster slots moved; subscribing their topics where they live now");
                self.shared.displaced(std::mem::take(&mut self.moved));
            }
            if !self.resend.is_empty() {
                let mut out = Vec::new();
                for t in std::mem::take(&mut self.resend) {
                    self.subscribe_cmds(&mut out, vec![t]);
                }
                if let Err(e) = send(&mut stream, &out).await {
                    return Lost::Io(e);
                }
            }
            tokio::select! {
                // On a plain socket room is made only once there is something to read, so
                // that an idle subscriber holds no buffer (see the tick below).
                read = stream.read_some(&mut buf) => match read {
                    Ok(0) => return Lost::Io(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) => {}
                    Err(e) => return Lost::Io(e),
                },
                _ = &mut wake => {
                    wake.set(node.wake.notified());
                    let mut out = Vec::new();
                    self.reconcile(&mut out);
                    if !out.is_empty() {
                        if let Err(e) = send(&mut stream, &out).await {
                            return Lost::Io(e);
                        }
                    }
                }
                Some(()) = probe_failed.recv() => {
                    probe.in_flight = false;
                    probe.next_at = Instant::now() + PROBE_RETRY;
                }
                _ = tick.tick() => {
                    // An empty read buffer is given back; the next read takes a new one. The
                    // buffer in use when a load ends was allocated during it, and one 64 KiB
                    // block keeps a whole 512 KiB allocator page resident
                    // (docs/performance-notes.md#what-a-load-leaves-behind).
                    // At most one allocation per tick.
                    if buf.is_empty() {
                        buf = BytesMut::new();
                    }
                    let now = Instant::now();
                    if probe
                        .unanswered_since
                        .is_some_and(|t| now.saturating_duration_since(t) > PROBE_TIMEOUT)
                    {
                        if let Some(cluster) = self.shared.cluster() {
                            cluster.refresh_soon();
                        }
                        return Lost::ProbeTimeout;
                    }
                    if !probe.in_flight && now >= probe.next_at {
                        probe.in_flight = true;
                        probe.unanswered_since.get_or_insert(now);
                        self.send_probe(probe_tx.clone());
                    }
                }
                _ = &mut reconnect => return Lost::Failover,
                _ = &mut closed => return Lost::Shutdown,
                _ = &mut stop => return Lost::Shutdown,
            }
        }
    }

    /// Publishes one probe in the background; a failure is reported on `failed`.
    fn send_probe(&self, failed: mpsc::Sender<()>) {
        let node = self.node.clone();
        let channel = self.probe_channel.clone();
        tokio::spawn(async move {
            match node
                .publisher
                .publish(channel, Bytes::from_static(b"probe"))
                .await
            {
                Ok(()) => node.publisher_ok.store(true, Ordering::Release),
                Err(_) => {
                    node.publisher_ok.store(false, Ordering::Release);
                    let _ = failed.send(()).await;
                }
            }
        });
    }

    /// Appends SUBSCRIBE commands (at most [`BATCH`] channels each) for `topics`.
    fn subscribe_cmds(&mut self, out: &mut Vec<u8>, topics: Vec<Arc<str>>) {
        for t in &topics {
            self.actual.insert(t.clone());
            *self.pending_acks.entry(t.clone()).or_insert(0) += 1;
        }
        self.channel_cmds(out, true, &topics);
    }

    /// Appends SUBSCRIBE (`subscribe`) or UNSUBSCRIBE commands for `topics`, at most [`BATCH`]
    /// channels each; on a cluster SSUBSCRIBE or SUNSUBSCRIBE, one partition per command (a
    /// command's channels must all be in one slot).
    fn channel_cmds(&mut self, out: &mut Vec<u8>, subscribe: bool, topics: &[Arc<str>]) {
        let verb: &[u8] = match (subscribe, self.node.sharded) {
            (true, false) => b"SUBSCRIBE",
            (false, false) => b"UNSUBSCRIBE",
            (true, true) => b"SSUBSCRIBE",
            (false, true) => b"SUNSUBSCRIBE",
        };
        let mut by_partition: Vec<(u16, &Arc<str>)> = topics
            .iter()
            .map(|t| (self.shared.partition(t), t))
            .collect();
        by_partition.sort_by_key(|(p, _)| *p);
        for group in by_partition.chunk_by(|a, b| a.0 == b.0) {
            for chunk in group.chunks(BATCH) {
                let topics: Vec<Arc<str>> = chunk.iter().map(|(_, t)| (*t).clone()).collect();
                if !subscribe && self.node.sharded {
                    for t in &topics {
                        *self.pending_unsubs.entry(t.clone()).or_insert(0) += 1;
                    }
                }
                let channels: Vec<Bytes> = topics.iter().map(|t| self.shared.channel(t)).collect();
                self.sent.push_back(Sent {
                    topics: Some(topics),
                    subscribe,
                    replies: chunk.len(),
                });
                let parts = std::iter::once(verb).chain(channels.iter().map(|c| &c[..]));
                resp::encode_command(out, parts.collect::<Vec<_>>().into_iter());
            }
        }
    }

    /// Brings the connection's subscriptions in line with what the shards want, for the topics
    /// that changed since last time.
    fn reconcile(&mut self, out: &mut Vec<u8>) {
        let (subscribe, unsubscribe) = {
            let mut st = self.shared.lock();
            let mut sub = Vec::new();
            let mut unsub = Vec::new();
            let dirty = std::mem::take(&mut *self.node.dirty());
            for t in dirty {
                let wanted = st.counts.contains_key(&t) && self.shared.owns(&self.node, &t);
                let have = self.actual.contains(&t);
                if wanted && !have {
                    sub.push(t);
                } else if !wanted && have {
                    // A topic that moved to another node of a cluster is still wanted: its
                    // confirmation and waiters are the new node's.
                    if !st.counts.contains_key(&t) {
                        st.confirmed.remove(&t);
                        st.waiters.remove(&t);
                    }
                    unsub.push(t);
                }
            }
            st.confirmed.shrink_when_sparse();
            st.waiters.shrink_when_sparse();
            (sub, unsub)
        };
        for t in &unsubscribe {
            self.actual.remove(t);
        }
        self.actual.shrink_when_sparse();
        if !subscribe.is_empty() {
            self.subscribe_cmds(out, subscribe);
        }
        if !unsubscribe.is_empty() {
            self.channel_cmds(out, false, &unsubscribe);
        }
    }

    /// Handles one value from the subscriber connection.
    async fn handle(
        &mut self,
        v: Value,
        probe: &mut Probe,
        failures: &mut u32,
    ) -> Result<(), Lost> {
        let items = match v {
            Value::Array(Some(items)) => items,
            Value::Error(e) => {
                let why: Arc<str> = String::from_utf8_lossy(&e).into();
                return match self.sent.pop_front() {
                    Some(Sent {
                        topics: Some(topics),
                        subscribe: true,
                        ..
                    }) => {
                        if self.shared.cluster().is_some() && is_elsewhere(&why) {
                            // The slot is not (or no longer) this node's: subscribe the topics
                            // where the slot table says they live.
                            self.not_here(&topics);
                            self.moved.extend(topics);
                        } else {
                            self.refused(topics, why);
                        }
                        Ok(())
                    }
                    // An UNSUBSCRIBE refused (its slot moved away): nothing left to undo here.
                    Some(Sent {
                        topics: Some(topics),
                        subscribe: false,
                        ..
                    }) => {
                        for t in &topics {
                            self.unsub_answered(t);
                        }
                        Ok(())
                    }
                    // The probe channel's SUBSCRIBE, or an error that answers nothing we sent.
                    _ => Err(Lost::Protocol(why.to_string())),
                };
            }
            _ => return Ok(()),
        };
        let mut it = items.into_iter();
        let (Some(Value::Bulk(Some(kind))), Some(second)) = (it.next(), it.next()) else {
            return Ok(());
        };
        let channel = match second {
            Value::Bulk(Some(c)) => c,
            _ => return Ok(()),
        };
        if &kind[..] == b"sunsubscribe" {
            // Ours, or the server's own: a slot of this node moved to another one.
            let name = self.shared.topic_name(&channel);
            let ours =
                name.and_then(|n| self.pending_unsubs.get_key_value(n).map(|(t, _)| t.clone()));
            if let Some(topic) = ours {
                self.unsub_answered(&topic);
            } else {
                if channel == self.probe_channel {
                    if let Some(cluster) = self.shared.cluster() {
                        cluster.refresh_soon();
                    }
                    return Err(Lost::Protocol("the probe channel's slot moved".into()));
                }
                if let Some(topic) = self.topic_of(&channel) {
                    self.not_here(std::slice::from_ref(&topic));
                    self.moved.push(topic);
                }
                return Ok(());
            }
        }
        if matches!(
            &kind[..],
            b"subscribe" | b"unsubscribe" | b"ssubscribe" | b"sunsubscribe"
        ) {
            // One reply of the oldest command still owed some.
            if let Some(front) = self.sent.front_mut() {
                front.replies -= 1;
                if front.replies == 0 {
                    self.sent.pop_front();
                }
            }
        }
        match &kind[..] {
            b"message" | b"smessage" => {
                let Some(Value::Bulk(Some(payload))) = it.next() else {
                    return Ok(());
                };
                if channel == self.probe_channel {
                    probe.answered();
                    if !self.node.live.swap(true, Ordering::AcqRel) {
                        tracing::info!(node = %self.node.name, "redis broker live");
                    }
                    *failures = 0;
                    return Ok(());
                }
                let Some(topic) = self.topic_of(&channel) else {
                    return Ok(());
                };
                if presence::is_event(&payload) {
                    if let Some(events) = self.shared.presence_events.get() {
                        let _ = events.try_send((topic, payload));
                    }
                    return Ok(());
                }
                let (position, payload) = positioned::parse(payload);
                if self.fanout.is_none() {
                    self.fanout = self.shared.fanout.get().cloned();
                }
                if let Some(fanout) = &mut self.fanout {
                    if let Some(shards) = fanout.direct(&topic) {
                        // A topic without a policy: the dispatcher would only frame it. Time
                        // spent waiting for a full shard channel is not the probe's.
                        let since = std::time::Instant::now();
                        let blocked = fanout.deliver(topic, &payload, since, shards).await;
                        if !blocked.is_zero() {
                            probe.stalled(blocked);
                        }
                        return Ok(());
                    }
                }
                let msg = Published {
                    topic,
                    payload,
                    position,
                    since: std::time::Instant::now(),
                    reply: None,
                };
                match self.dispatch.try_send(msg) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(msg)) => {
                        // The dispatcher is behind: this task waits, reading nothing, so the
                        // probe's answer cannot be seen meanwhile. That time is not the probe's.
                        let blocked = Instant::now();
                        if self.dispatch.send(msg).await.is_err() {
                            return Err(Lost::Shutdown);
                        }
                        probe.stalled(blocked.elapsed());
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Err(Lost::Shutdown),
                }
            }
            b"subscribe" | b"ssubscribe" => {
                if channel == self.probe_channel {
                    return Ok(());
                }
                // A topic left before its acknowledgement came is no longer in `actual`, but
                // the acknowledgement still settles its count: the topic may be joined again,
                // and its next SUBSCRIBE's acknowledgement must then be the last one owed.
                let Some(topic) = self
                    .topic_of(&channel)
                    .or_else(|| self.pending_topic(&channel))
                else {
                    return Ok(());
                };
                let done = match self.pending_acks.get_mut(&topic) {
                    Some(n) => {
                        *n -= 1;
                        *n == 0
                    }
                    None => false,
                };
                if done {
                    self.pending_acks.remove(&topic);
                    self.pending_acks.shrink_when_sparse();
                    if !self.actual.contains(&topic) {
                        // Left meanwhile: nothing to confirm.
                        return Ok(());
                    }
                    let mut st = self.shared.lock();
                    st.confirmed.insert(topic.clone());
                    for w in st.waiters.remove(&topic).unwrap_or_default() {
                        let _ = w.send(Ok(()));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// One SUNSUBSCRIBE of `topic` was answered.
    fn unsub_answered(&mut self, topic: &Arc<str>) {
        if let Some(n) = self.pending_unsubs.get_mut(topic) {
            *n -= 1;
            if *n == 0 {
                self.pending_unsubs.remove(topic);
                self.pending_unsubs.shrink_when_sparse();
            }
        }
    }

    /// `topics` are not subscribed on this node after all (the server ended or refused their
    /// subscription because their slot lives elsewhere).
    fn not_here(&mut self, topics: &[Arc<str>]) {
        let mut st = self.shared.lock();
        for t in topics {
            self.actual.remove(t);
            if self.pending_acks.remove(t).is_some() {
                self.pending_acks.shrink_when_sparse();
            }
            st.confirmed.remove(t);
        }
    }

    /// Redis refused the SUBSCRIBE of `topics` with `why`. A batch is sent again one topic per
    /// command, so that only the refused ones fail; a single topic is refused: its joins fail
    /// with `why`, and the connection stays.
    fn refused(&mut self, topics: Vec<Arc<str>>, why: Arc<str>) {
        for t in &topics {
            if let Some(n) = self.pending_acks.get_mut(t) {
                *n -= 1;
                if *n == 0 {
                    self.pending_acks.remove(t);
                }
            }
        }
        if topics.len() > 1 {
            self.resend
                .extend(topics.into_iter().filter(|t| self.actual.contains(t)));
            return;
        }
        let mut st = self.shared.lock();
        for t in topics {
            if !self.actual.remove(&t) || !st.counts.contains_key(&t) {
                continue;
            }
            tracing::warn!(topic = %t, error = %why, "redis refused a subscription");
            st.refused.insert(t.clone(), why.clone());
            for w in st.waiters.remove(&t).unwrap_or_default() {
                let _ = w.send(Err(why.clone()));
            }
        }
    }

    /// The topic of a channel whose SUBSCRIBE is still unacknowledged (no allocation).
    fn pending_topic(&self, channel: &[u8]) -> Option<Arc<str>> {
        let name = self.shared.topic_name(channel)?;
        self.pending_acks
            .get_key_value(name)
            .map(|(t, _)| t.clone())
    }

    /// The interned topic of a channel this connection subscribed to (no allocation).
    fn topic_of(&self, channel: &[u8]) -> Option<Arc<str>> {
        let name = self.shared.topic_name(channel)?;
        self.actual.get(name).cloned()
    }
}

/// Whether a cluster node's error reply says that the slot lives, or is moving, elsewhere.
fn is_elsewhere(error: &str) -> bool {
    ["MOVED ", "ASK ", "TRYAGAIN", "CLUSTERDOWN"]
        .iter()
        .any(|p| error.starts_with(p))
}

/// A SUBSCRIBE or UNSUBSCRIBE command whose replies are still owed.
#[derive(Debug)]
struct Sent {
    /// The topics of the command; `None` for the probe channel's.
    topics: Option<Vec<Arc<str>>>,
    /// SUBSCRIBE (or SSUBSCRIBE), not UNSUBSCRIBE.
    subscribe: bool,
    /// Replies still owed: one per channel.
    replies: usize,
}

/// The liveness probe of one subscriber connection: a message published on the instance's probe
/// channel must come back on this connection.
#[derive(Debug)]
struct Probe {
    /// A probe publish is under way or published and not yet received.
    in_flight: bool,
    /// When the oldest unanswered probe was sent; past [`PROBE_TIMEOUT`] the connection is
    /// rebuilt.
    unanswered_since: Option<Instant>,
    /// When to send the next probe.
    next_at: Instant,
}

impl Probe {
    fn new() -> Self {
        Self {
            in_flight: false,
            unanswered_since: None,
            next_at: Instant::now(),
        }
    }

    /// The subscriber was blocked for `d` handing messages to the dispatcher: the unanswered
    /// probe's deadline moves by as much.
    fn stalled(&mut self, d: Duration) {
        if let Some(since) = &mut self.unanswered_since {
            *since += d;
        }
    }

    fn answered(&mut self) {
        self.in_flight = false;
        self.unanswered_since = None;
        self.next_at = Instant::now() + PROBE_INTERVAL;
    }
}

/// Capped exponential backoff with ±50 % jitter.
fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1u32 << failures.min(10).saturating_sub(1))
        .min(BACKOFF_MAX);
    let jitter = (uuid::Uuid::new_v4().as_u64_pair().0 % 1000) as f64 / 1000.0; // 0..1
    base.mul_f64(0.5 + jitter)
}

/// Writes `out` whole; `flush`, because a TLS stream may hold the end of what it was given.
async fn send(stream: &mut Stream, out: &[u8]) -> std::io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for f in 1..40 {
            let d = backoff(f);
            assert!(
                d >= BACKOFF_MIN / 2 && d <= BACKOFF_MAX.mul_f64(1.5),
                "{f}: {d:?}"
            );
        }
        assert!(backoff(1) < Duration::from_millis(100));
    }

    /// A stand-in for a Redis that accepts connections and never says anything.
    async fn silent_redis() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        format!("redis://127.0.0.1:{port}/")
    }

    fn settings(url: &str) -> RedisSettings {
        RedisSettings {
            url: url.to_owned(),
            prefix: String::new(),
            tls: None,
        }
    }

    fn broker(url: &str) -> (RedisBroker, mpsc::Receiver<Published>) {
        let (tx, rx) = mpsc::channel(16);
        let broker = RedisBroker::start(settings(url), 1, tx, Arc::default()).unwrap();
        (broker, rx)
    }

    fn waiting(broker: &RedisBroker) -> usize {
        broker.shared.lock().waiters.values().map(Vec::len).sum()
    }

    #[tokio::test]
    async fn timed_out_waiters_do_not_stay_in_the_map() {
        let (broker, _rx) = broker(&silent_redis().await);
        let topic: Arc<str> = Arc::from("room");
        broker.interest().first_in_shard(&topic);
        let waits = (0..200).map(|_| broker.wait_subscribed("room"));
        futures_util::future::join_all(waits).await;
        assert_eq!(waiting(&broker), 0, "every waiter timed out");
        broker.stop();
    }

    #[tokio::test]
    async fn waiters_of_a_topic_left_during_an_outage_are_dropped() {
        // Nothing listens: the subscriber is between connection attempts.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (broker, _rx) = broker(&format!("redis://127.0.0.1:{port}/"));
        let topic: Arc<str> = Arc::from("room");
        let interest = broker.interest();
        interest.first_in_shard(&topic);
        let b = broker.clone();
        let wait = tokio::spawn(async move { b.wait_subscribed("room").await });
        while waiting(&broker) == 0 {
            tokio::task::yield_now().await;
        }
        interest.last_in_shard(&topic);
        assert_eq!(
            waiting(&broker),
            0,
            "the waiter of a topic no longer wanted was kept"
        );
        assert!(wait.await.unwrap().is_ok());
        broker.stop();
    }

    /// A subscriber task's state, driven by hand (no connection).
    fn subscriber() -> Subscriber {
        let (dispatch, _) = mpsc::channel(1);
        let target = Target::from_url("redis://127.0.0.1:1/", None).unwrap();
        let node = Node::new(&target, false);
        node.set_probe(Bytes::from_static(b"__rtk_probe:1"));
        let shared = Arc::new(Shared {
            interest: Mutex::new(Interest::default()),
            prefix: String::new(),
            stopped: AtomicBool::new(false),
            presence_events: std::sync::OnceLock::new(),
            fanout: std::sync::OnceLock::new(),
            instance: "1".into(),
            layout: Layout::Single(node.clone()),
        });
        let mut sub = Subscriber::new(shared, node, target, dispatch, Arc::default());
        sub.probe_channel = sub.node.probe_channel();
        sub
    }

    /// Redis's acknowledgement of one channel of a SUBSCRIBE or UNSUBSCRIBE.
    fn ack(kind: &'static [u8], channel: &'static [u8]) -> Value {
        Value::Array(Some(vec![
            Value::Bulk(Some(Bytes::from_static(kind))),
            Value::Bulk(Some(Bytes::from_static(channel))),
            Value::Int(1),
        ]))
    }

    #[tokio::test]
    async fn a_late_ack_of_a_topic_left_meanwhile_does_not_leave_the_next_join_unconfirmed() {
        let mut sub = subscriber();
        let interest: Arc<dyn TopicInterest> = sub.shared.clone();
        let topic: Arc<str> = Arc::from("room");
        let (mut probe, mut failures, mut out) = (Probe::new(), 0, Vec::new());

        // Joined: SUBSCRIBE sent. Left before Redis answered: UNSUBSCRIBE sent.
        interest.first_in_shard(&topic);
        sub.reconcile(&mut out);
        interest.last_in_shard(&topic);
        sub.reconcile(&mut out);
        // The SUBSCRIBE's acknowledgement arrives now, after the topic was left.
        sub.handle(ack(b"subscribe", b"room"), &mut probe, &mut failures)
            .await
            .unwrap();
        // Joined again: SUBSCRIBE sent; Redis answers the UNSUBSCRIBE, then this SUBSCRIBE.
        interest.first_in_shard(&topic);
        sub.reconcile(&mut out);
        sub.handle(ack(b"unsubscribe", b"room"), &mut probe, &mut failures)
            .await
            .unwrap();
        sub.handle(ack(b"subscribe", b"room"), &mut probe, &mut failures)
            .await
            .unwrap();
        assert!(
            sub.shared.lock().confirmed.contains("room"),
            "the second join was never confirmed"
        );
        assert!(sub.pending_acks.is_empty(), "{:?}", sub.pending_acks);
    }

    /// A stand-in for Redis that acknowledges every SUBSCRIBE, answers PUBLISH with `:1`, and
    /// refuses a publish of `refuse me` with an error.
    async fn answering_redis() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = BytesMut::new();
                    loop {
                        while let Some(Value::Array(Some(parts))) = resp::parse(&mut buf).unwrap() {
                            let arg = |i: usize| match parts.get(i) {
                                Some(Value::Bulk(Some(b))) => b.clone(),
                                _ => Bytes::new(),
                            };
                            let mut out = Vec::new();
                            match &arg(0)[..] {
                                b"SUBSCRIBE" => {
                                    for i in 1..parts.len() {
                                        let ch = arg(i);
                                        out.extend_from_slice(
                                            format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n", ch.len())
                                                .as_bytes(),
                                        );
                                        out.extend_from_slice(&ch);
                                        out.extend_from_slice(format!("\r\n:{i}\r\n").as_bytes());
                                    }
                                }
                                b"PUBLISH" if &arg(2)[..] == b"refuse me" => {
                                    out.extend_from_slice(b"-ERR refused for the test\r\n")
                                }
                                _ => out.extend_from_slice(b":1\r\n"),
                            }
                            if stream.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                        if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                });
            }
        });
        format!("redis://127.0.0.1:{port}/")
    }

    #[tokio::test]
    async fn a_publish_redis_refused_does_not_fail_the_next_one() {
        let (broker, _rx) = broker(&answering_redis().await);
        let refused = broker
            .publish("room", Bytes::from_static(b"refuse me"))
            .await;
        assert!(
            matches!(&refused, Err(PublishError::Unavailable(e)) if e.contains("refused for the test")),
            "{refused:?}"
        );
        let next = broker.publish("room", Bytes::from_static(b"fine")).await;
        assert!(next.is_ok(), "{next:?}");
        broker.stop();
    }

    /// A stand-in for Redis's pub/sub whose delivery the test drives: SUBSCRIBE is acknowledged
    /// and the connection becomes the subscriber connection (its writes go through the returned
    /// sender); every PUBLISH is answered `:1` and handed to the test, which decides when (and
    /// whether) the subscriber connection receives it.
    async fn driven_redis() -> (
        String,
        mpsc::UnboundedReceiver<(Bytes, Bytes)>,
        Arc<Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (published_tx, published) = mpsc::unbounded_channel();
        let sub: Arc<Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>> = Arc::default();
        let sub_slot = sub.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (published_tx, sub_slot) = (published_tx.clone(), sub_slot.clone());
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let (mut read, mut write) = stream.into_split();
                    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
                    tokio::spawn(async move {
                        while let Some(bytes) = out_rx.recv().await {
                            if write.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                    });
                    let mut buf = BytesMut::new();
                    loop {
                        while let Some(Value::Array(Some(parts))) = resp::parse(&mut buf).unwrap() {
                            let arg = |i: usize| match parts.get(i) {
                                Some(Value::Bulk(Some(b))) => b.clone(),
                                _ => Bytes::new(),
                            };
                            let mut out = Vec::new();
                            if &arg(0)[..] == b"SUBSCRIBE" {
                                *sub_slot.lock().unwrap() = Some(out_tx.clone());
                                for i in 1..parts.len() {
                                    let ch = arg(i);
                                    out.extend_from_slice(
                                        format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n", ch.len())
                                            .as_bytes(),
                                    );
                                    out.extend_from_slice(&ch);
                                    out.extend_from_slice(format!("\r\n:{i}\r\n").as_bytes());
                                }
                            } else {
                                if &arg(0)[..] == b"PUBLISH" {
                                    let _ = published_tx.send((arg(1), arg(2)));
                                }
                                out.extend_from_slice(b":1\r\n");
                            }
                            let _ = out_tx.send(out);
                        }
                        if read.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                });
            }
        });
        (format!("redis://127.0.0.1:{port}/"), published, sub)
    }

    /// A `message` push as Redis sends it on a subscriber connection.
    fn message(channel: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        resp::encode_command(&mut out, [&b"message"[..], channel, payload].into_iter());
        out
    }

    #[tokio::test]
    async fn time_blocked_on_a_full_dispatch_channel_does_not_count_against_the_probe() {
        let (url, mut published, sub) = driven_redis().await;
        // Room for one message: the dispatcher (this test) does not read while it stalls.
        let (tx, mut rx) = mpsc::channel(1);
        let metrics = Arc::new(Metrics::default());
        let broker = RedisBroker::start(settings(&url), 1, tx, metrics.clone()).unwrap();
        let send_to_subscriber = |bytes: Vec<u8>| {
            let sub = sub.lock().unwrap().clone().expect("subscribed");
            sub.send(bytes).unwrap();
        };
        let deadline = Duration::from_secs(10);
        // The first probe comes back at once: the broker is live.
        let (channel, payload) = tokio::time::timeout(deadline, published.recv())
            .await
            .unwrap()
            .unwrap();
        send_to_subscriber(message(&channel, &payload));
        broker.interest().first_in_shard(&Arc::from("room"));
        assert!(broker.wait_subscribed("room").await.is_ok());
        assert!(broker.is_live());

        // The next probe is published and held back; meanwhile the subscriber gets more than
        // the dispatcher takes, and stays blocked handing it over for longer than PROBE_TIMEOUT.
        let (channel, payload) = tokio::time::timeout(deadline, published.recv())
            .await
            .unwrap()
            .unwrap();
        for n in 0..3 {
            send_to_subscriber(message(b"room", format!("m{n}").as_bytes()));
        }
        tokio::time::sleep(PROBE_TIMEOUT + Duration::from_secs(1)).await;
        for n in 0..3 {
            let m = tokio::time::timeout(deadline, rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(m.payload, format!("m{n}").as_bytes());
        }
        // The subscriber has caught up; the probe's answer comes a moment later.
        tokio::time::sleep(Duration::from_millis(200)).await;
        send_to_subscriber(message(&channel, &payload));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            metrics.snapshot().broker_reconnects,
            0,
            "the probe timed out on time the subscriber spent waiting for the dispatcher"
        );
        assert!(broker.is_live());
        broker.stop();
    }

    #[tokio::test]
    async fn a_refused_batch_is_retried_one_topic_per_command_and_only_the_refused_one_fails() {
        let mut sub = subscriber();
        let interest: Arc<dyn TopicInterest> = sub.shared.clone();
        let (mut probe, mut failures, mut out) = (Probe::new(), 0, Vec::new());
        for t in ["open", "closed"] {
            interest.first_in_shard(&Arc::from(t));
        }
        sub.reconcile(&mut out);
        assert_eq!(sub.sent.len(), 1, "one SUBSCRIBE of both topics");
        let noperm = || Value::Error(Bytes::from_static(b"NOPERM no access to a channel"));
        // Refused as a whole: each topic is sent again on its own.
        sub.handle(noperm(), &mut probe, &mut failures)
            .await
            .unwrap();
        let mut resend = std::mem::take(&mut sub.resend);
        resend.sort();
        assert_eq!(resend, [Arc::from("closed"), Arc::from("open")]);
        for t in resend {
            sub.subscribe_cmds(&mut out, vec![t]);
        }
        // Redis refuses "closed" and acknowledges "open".
        sub.handle(noperm(), &mut probe, &mut failures)
            .await
            .unwrap();
        sub.handle(ack(b"subscribe", b"open"), &mut probe, &mut failures)
            .await
            .unwrap();
        let st = sub.shared.lock();
        assert!(st.confirmed.contains("open"));
        assert!(
            st.refused
                .get("closed")
                .is_some_and(|e| e.contains("NOPERM"))
        );
        assert!(sub.sent.is_empty() && sub.pending_acks.is_empty());
    }
}

#[cfg(test)]
mod cluster_tests {
    use super::*;
    use crate::broker::cluster::{Range, Spec, apply};
    use crate::broker::slots;

    /// A cluster broker's shared state with two primaries (slots 0–8191 on A, the rest on B)
    /// and A's subscriber, driven by hand (no connection).
    fn subscriber_of_a() -> (Subscriber, Arc<Node>) {
        let spec = Spec::from_url("redis+cluster://127.0.0.1:1/")
            .unwrap()
            .unwrap();
        let template = Target::from_url(&spec.node_url, None).unwrap();
        let shared = Arc::new(Shared {
            interest: Mutex::new(Interest::default()),
            prefix: "app:".into(),
            stopped: AtomicBool::new(false),
            presence_events: std::sync::OnceLock::new(),
            fanout: std::sync::OnceLock::new(),
            instance: "1".into(),
            layout: Layout::Cluster(Cluster::new(&spec, template).unwrap()),
        });
        let range = |first, last, port| Range {
            first,
            last,
            host: "127.0.0.1".into(),
            port,
        };
        let ranges = vec![range(0, 8191, 7001), range(8192, 16383, 7002)];
        apply(
            &shared,
            shared.cluster().unwrap(),
            ranges,
            &|_: &Arc<Node>, _| {},
        );
        let table = shared.cluster().unwrap().table();
        let (a, b) = (table.nodes[0].clone(), table.nodes[1].clone());
        let (dispatch, _) = mpsc::channel(1);
        let target = shared.cluster().unwrap().target("127.0.0.1", 7001);
        let mut sub = Subscriber::new(shared, a, target, dispatch, Arc::default());
        sub.probe_channel = sub.node.probe_channel();
        (sub, b)
    }

    /// Topics of A (slots below 8192), from distinct partitions.
    fn topics_of(sub: &Subscriber, n: usize) -> Vec<Arc<str>> {
        (0..)
            .map(|i| Arc::<str>::from(format!("room:{i}")))
            .filter(|t| sub.shared.owns(&sub.node, t))
            .take(n)
            .collect()
    }

    /// The commands in `out`, each as its words.
    fn commands(out: &[u8]) -> Vec<Vec<Bytes>> {
        let mut buf = BytesMut::from(out);
        let mut cmds = Vec::new();
        while let Some(Value::Array(Some(parts))) = resp::parse(&mut buf).unwrap() {
            cmds.push(
                parts
                    .into_iter()
                    .map(|p| match p {
                        Value::Bulk(Some(b)) => b,
                        other => panic!("{other:?}"),
                    })
                    .collect(),
            );
        }
        cmds
    }

    fn push(kind: &'static [u8], channel: Bytes) -> Value {
        Value::Array(Some(vec![
            Value::Bulk(Some(Bytes::from_static(kind))),
            Value::Bulk(Some(channel)),
            Value::Int(0),
        ]))
    }

    #[test]
    fn names_carry_the_partition_tag_first_and_parse_back() {
        let (sub, _) = subscriber_of_a();
        let shared = &sub.shared;
        let c = shared.cluster().unwrap();
        let tag = c.partitions.tag(c.partitions.of("general"));
        assert_eq!(
            &shared.channel("general")[..],
            format!("{{{tag}}}app:general").as_bytes()
        );
        assert_eq!(shared.key_tag("general"), format!("{{{tag}}}app:general"));
        let (meta, _) = positioned::keys(&shared.key_tag("general"));
        assert_eq!(slots::slot(&meta), slots::slot(&shared.channel("general")));
        assert_eq!(
            shared.topic_name(&shared.channel("general")),
            Some("general")
        );
        assert_eq!(shared.topic_name(b"app:general"), None);
        assert_eq!(shared.topic_name(b"{x}other:general"), None);
        // The probe rides on a slot of its own node.
        let probe = sub.node.probe_channel();
        assert!(slots::slot(&probe) < 8192, "{probe:?}");
    }

    #[test]
    fn each_ssubscribe_carries_the_channels_of_one_slot() {
        let (mut sub, _) = subscriber_of_a();
        let mut topics = topics_of(&sub, 40);
        // Two topics of one partition go in one command.
        let p = sub.shared.partition(&topics[0]);
        let twin: Arc<str> = (0..)
            .map(|i| Arc::<str>::from(format!("twin:{i}")))
            .find(|t| sub.shared.partition(t) == p)
            .unwrap();
        topics.push(twin.clone());
        let mut out = Vec::new();
        sub.subscribe_cmds(&mut out, topics.clone());
        let cmds = commands(&out);
        let partitions: AHashSet<u16> = topics.iter().map(|t| sub.shared.partition(t)).collect();
        assert_eq!(cmds.len(), partitions.len());
        for cmd in &cmds {
            assert_eq!(&cmd[0][..], b"SSUBSCRIBE");
            let slots: AHashSet<u16> = cmd[1..].iter().map(|c| slots::slot(c)).collect();
            assert_eq!(slots.len(), 1, "{cmd:?}");
        }
        assert!(
            cmds.iter().any(|c| c.len() == 3),
            "the twins share a command"
        );
        assert_eq!(sub.sent.len(), cmds.len());
    }

    #[tokio::test]
    async fn a_sunsubscribe_the_server_sent_takes_the_topic_off_and_ours_are_acknowledged() {
        let (mut sub, _) = subscriber_of_a();
        let interest: Arc<dyn TopicInterest> = sub.shared.clone();
        let topics = topics_of(&sub, 2);
        let (mut probe, mut failures, mut out) = (Probe::new(), 0, Vec::new());
        for t in &topics {
            interest.first_in_shard(t);
        }
        sub.reconcile(&mut out);
        for t in &topics {
            let ack = push(b"ssubscribe", sub.shared.channel(t));
            sub.handle(ack, &mut probe, &mut failures).await.unwrap();
        }
        assert!(sub.sent.is_empty());
        assert_eq!(sub.shared.lock().confirmed.len(), 2);

        // We leave topic 0: our SUNSUBSCRIBE's acknowledgement settles what is owed.
        interest.last_in_shard(&topics[0]);
        sub.reconcile(&mut out);
        assert_eq!(sub.sent.len(), 1);
        let ack = push(b"sunsubscribe", sub.shared.channel(&topics[0]));
        sub.handle(ack, &mut probe, &mut failures).await.unwrap();
        assert!(sub.sent.is_empty() && sub.pending_unsubs.is_empty());

        // The server ends topic 1's subscription (its slot moved): not an acknowledgement of
        // anything, and the topic is no longer on this connection.
        let ended = push(b"sunsubscribe", sub.shared.channel(&topics[1]));
        sub.handle(ended, &mut probe, &mut failures).await.unwrap();
        assert!(!sub.actual.contains(&topics[1]));
        assert!(!sub.shared.lock().confirmed.contains(&topics[1]));
        assert!(
            sub.shared.lock().counts.contains_key(&topics[1]),
            "still wanted"
        );

        // The probe channel's subscription ended: the connection is made again.
        let probe_ended = push(b"sunsubscribe", sub.probe_channel.clone());
        let lost = sub.handle(probe_ended, &mut probe, &mut failures).await;
        assert!(matches!(lost, Err(Lost::Protocol(_))), "{lost:?}");
    }

    #[tokio::test]
    async fn a_moved_reply_to_ssubscribe_is_not_a_refusal() {
        let (mut sub, _) = subscriber_of_a();
        let interest: Arc<dyn TopicInterest> = sub.shared.clone();
        let topic = topics_of(&sub, 1).remove(0);
        let (mut probe, mut failures, mut out) = (Probe::new(), 0, Vec::new());
        interest.first_in_shard(&topic);
        sub.reconcile(&mut out);
        let moved = Value::Error(Bytes::from_static(b"MOVED 3999 127.0.0.1:7002"));
        sub.handle(moved, &mut probe, &mut failures).await.unwrap();
        assert!(sub.shared.lock().refused.is_empty());
        assert!(!sub.actual.contains(&topic) && sub.pending_acks.is_empty());
        assert!(sub.sent.is_empty());
    }

    #[test]
    fn a_topic_whose_slot_moves_is_marked_on_both_nodes() {
        let (mut sub, b) = subscriber_of_a();
        let interest: Arc<dyn TopicInterest> = sub.shared.clone();
        let topic = topics_of(&sub, 1).remove(0);
        let mut out = Vec::new();
        interest.first_in_shard(&topic);
        sub.reconcile(&mut out);
        assert!(sub.actual.contains(&topic));
        // Every slot moves to B.
        let c = sub.shared.cluster().unwrap();
        let all = vec![Range {
            first: 0,
            last: 16383,
            host: "127.0.0.1".into(),
            port: 7002,
        }];
        apply(&sub.shared, c, all, &|_: &Arc<Node>, _| {});
        assert!(b.dirty().contains(&topic), "the new node subscribes it");
        let mut out = Vec::new();
        sub.reconcile(&mut out);
        let cmds = commands(&out);
        assert_eq!(cmds.len(), 1);
        assert_eq!(&cmds[0][0][..], b"SUNSUBSCRIBE", "the old node lets it go");
        assert!(!sub.actual.contains(&topic));
        assert!(sub.node.stopped.load(Ordering::Acquire), "A left the table");
    }
}
