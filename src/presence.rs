//! Presence: which users are in a topic, with how many connections, on every instance; and
//! the `rtk1` `join` and `leave` messages when a user's first connection arrives or their last
//! one leaves.
//!
//! Only topics whose [`TopicPolicy`](crate::TopicPolicy) says `presence` are tracked: a join,
//! leave or disconnect asks the policy rule, and nothing else happens for other topics. Nothing
//! here is on the delivery path: presence changes with memberships, never with publications.
//!
//! [`Presence`] keeps this instance's memberships (topic → connection → user) under one std
//! mutex, never held across an `.await`. In-process, that map is the truth: its per-user
//! counts give `join` (0 → 1) and `leave` (1 → 0), which go to every shard as
//! [`Command::Presence`] for the topic's `rtk1` subscribers. With Redis, the truth is in Redis
//! (`broker/presence.rs`): one script per change updates the counts atomically and publishes
//! `join`/`leave` on the topic's channel behind a header, so every instance hears each user's
//! transition once; the map then only says which entries this instance owns, to renew them
//! every `presence_refresh`, to put them back if Redis lost them, and to remove them at once on
//! a graceful shutdown.
//!
//! A connection that ended without a close (its TCP connection dropped) stays present for
//! `presence_grace`, so a client that reconnects at once causes no `leave`/`join` pair.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ahash::AHashMap;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::broker::BrokerHandle;
use crate::frame;
use crate::history::PolicyRule;
use crate::routes::{self, Routes};
use crate::shard::Command;

/// Who a connection is, for presence: the user's id and the application's info about them
/// (JSON text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) user: Arc<str>,
    pub(crate) info: Arc<str>,
}

impl Identity {
    pub(crate) fn new(user: String, info: &serde_json::Value) -> Self {
        Self {
            user: user.into(),
            info: info.to_string().into(),
        }
    }
}

/// One user present in a topic.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PresenceEntry {
    /// The user's id, as [`presence_user`](crate::WebsocketServiceBuilder::presence_user) gave
    /// it.
    pub user: String,
    /// The user's connections in the topic, over every instance.
    pub connections: u64,
    /// The application's info about the user (from their most recent connection).
    pub info: serde_json::Value,
}

/// A page of a topic's presence (see
/// [`WebsocketService::presence`](crate::ws::service::WebsocketService::presence)).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct PresencePage {
    /// The users of this page.
    pub users: Vec<PresenceEntry>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<String>,
}

/// How many users and connections a topic has, over every instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PresenceStats {
    /// Users with at least one connection in the topic.
    pub users: u64,
    /// Connections in the topic.
    pub connections: u64,
}

/// Why presence could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PresenceError {
    /// The topic does not track presence: its [`TopicPolicy`](crate::TopicPolicy) has no
    /// `presence(true)`, or it has no policy.
    NotEnabled,
    /// The broker could not answer (Redis unreachable), with its reason.
    Unavailable(String),
}

impl std::fmt::Display for PresenceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotEnabled => f.write_str("the topic does not track presence"),
            Self::Unavailable(e) => write!(f, "presence unavailable: {e}"),
        }
    }
}

impl std::error::Error for PresenceError {}

/// A user's connections in one topic, on this instance.
#[derive(Debug)]
struct UserState {
    connections: u64,
    info: Arc<str>,
}

/// One topic's memberships on this instance.
#[derive(Debug, Default)]
struct TopicState {
    /// Ordered, so pages follow the user id.
    users: BTreeMap<Arc<str>, UserState>,
    conns: AHashMap<Uuid, Arc<str>>,
}

/// This instance's memberships in presence topics.
#[derive(Debug, Default)]
struct Local {
    topics: AHashMap<Arc<str>, TopicState>,
    /// The presence topics each connection is in, for its removal.
    by_conn: AHashMap<Uuid, Vec<Arc<str>>>,
}

/// What a membership change did to its user.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    None,
    /// The user's first connection in the topic (this instance's, with Redis).
    First(Arc<str>, Arc<str>),
    /// The user's last connection left.
    Last(Arc<str>, Arc<str>),
}

impl Local {
    fn add(&mut self, topic: &Arc<str>, conn: Uuid, who: &Identity) -> Option<Change> {
        let state = self.topics.entry(topic.clone()).or_default();
        if state.conns.contains_key(&conn) {
            return None;
        }
        state.conns.insert(conn, who.user.clone());
        self.by_conn.entry(conn).or_default().push(topic.clone());
        let user = state
            .users
            .entry(who.user.clone())
            .or_insert_with(|| UserState {
                connections: 0,
                info: who.info.clone(),
            });
        user.connections += 1;
        user.info = who.info.clone();
        Some(if user.connections == 1 {
            Change::First(who.user.clone(), who.info.clone())
        } else {
            Change::None
        })
    }

    fn remove(&mut self, topic: &str, conn: Uuid) -> Option<Change> {
        let state = self.topics.get_mut(topic)?;
        let user = state.conns.remove(&conn)?;
        if let Some(topics) = self.by_conn.get_mut(&conn) {
            topics.retain(|t| &**t != topic);
            if topics.is_empty() {
                self.by_conn.remove(&conn);
            }
        }
        let mut change = Change::None;
        if let Some(u) = state.users.get_mut(&user) {
            u.connections -= 1;
            if u.connections == 0 {
                let info = u.info.clone();
                state.users.remove(&user);
                change = Change::Last(user, info);
            }
        }
        if state.conns.is_empty() {
            self.topics.remove(topic);
        }
        Some(change)
    }
}

/// Presence for one instance; see the module docs.
pub(crate) struct Presence {
    rule: Option<PolicyRule>,
    shards: Arc<[mpsc::Sender<Command>]>,
    /// Which shards hold each topic: an event goes only to those.
    routes: Arc<Routes>,
    broker: BrokerHandle,
    /// Guarded by a std mutex: held for map updates only, never across an await.
    local: Mutex<Local>,
    grace: Duration,
    /// Set by a graceful shutdown: entries are no longer added.
    stopped: AtomicBool,
    /// Connections in at least one presence topic here (the size of `by_conn`): while zero, a
    /// connection that ends does not take the lock. Written under the lock; read without it
    /// (`Relaxed`: a connection's own add happened before its end, in its own task).
    members: AtomicUsize,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("topics", &self.lock().topics.len())
            .finish_non_exhaustive()
    }
}

/// Most users one page of [`Presence::list`] holds.
pub(crate) const MAX_PAGE: usize = 10_000;

/// Most users an `rtk1` `presence` reply lists.
pub(crate) const REPLY_MAX_USERS: usize = 1_000;

impl Presence {
    pub(crate) fn new(
        rule: Option<PolicyRule>,
        shards: Arc<[mpsc::Sender<Command>]>,
        routes: Arc<Routes>,
        broker: BrokerHandle,
        grace: Duration,
    ) -> Self {
        Self {
            rule,
            shards,
            routes,
            broker,
            local: Mutex::default(),
            grace,
            stopped: AtomicBool::new(false),
            members: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any topic may track presence (a policy rule is set): only then do connections
    /// carry an [`Identity`].
    pub(crate) fn possible(&self) -> bool {
        self.rule.is_some()
    }

    /// Whether `topic` tracks presence.
    pub(crate) fn enabled(&self, topic: &str) -> bool {
        self.rule
            .as_ref()
            .and_then(|rule| rule(topic))
            .is_some_and(|p| p.presence)
    }

    fn redis(&self) -> Option<&crate::broker::redis::RedisBroker> {
        match &self.broker {
            BrokerHandle::Redis(r) => Some(r),
            BrokerHandle::Local(_) => None,
        }
    }

    /// `conn` (of user `who`) is in `topic` now.
    pub(crate) async fn add(&self, topic: &str, conn: Uuid, who: &Identity) {
        if self.stopped.load(Ordering::Acquire) || !self.enabled(topic) {
            return;
        }
        let topic: Arc<str> = Arc::from(topic);
        let change = {
            let mut local = self.lock();
            let change = local.add(&topic, conn, who);
            self.members.store(local.by_conn.len(), Ordering::Relaxed);
            change
        };
        match (self.redis(), change) {
            (_, None) => {}
            (Some(redis), Some(_)) => {
                if let Err(e) = redis.presence_add(&topic, conn, who).await {
                    tracing::warn!(error = %e, %topic, "presence: could not add a connection");
                }
            }
            (None, Some(change)) => self.announce(&topic, change).await,
        }
    }

    /// `conn` left `topic`.
    pub(crate) async fn remove(&self, topic: &str, conn: Uuid) {
        let change = {
            let mut local = self.lock();
            let change = local.remove(topic, conn);
            self.members.store(local.by_conn.len(), Ordering::Relaxed);
            change
        };
        match (self.redis(), change) {
            (_, None) => {}
            (Some(redis), Some(_)) => {
                if let Err(e) = redis.presence_remove(topic, conn).await {
                    tracing::warn!(error = %e, %topic, "presence: could not remove a connection");
                }
            }
            (None, Some(change)) => self.announce(&Arc::from(topic), change).await,
        }
    }

    /// `conn` ended: it leaves every presence topic it was in, at once after a clean close,
    /// after the grace otherwise.
    pub(crate) async fn remove_conn(self: &Arc<Self>, conn: Uuid, clean: bool) {
        if self.members.load(Ordering::Relaxed) == 0 {
            return;
        }
        let topics = self.lock().by_conn.get(&conn).cloned().unwrap_or_default();
        if topics.is_empty() {
            return;
        }
        if clean || self.grace.is_zero() || self.stopped.load(Ordering::Acquire) {
            for topic in topics {
                self.remove(&topic, conn).await;
            }
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(this.grace).await;
            for topic in topics {
                this.remove(&topic, conn).await;
            }
        });
    }

    /// Sends a local change's `join` or `leave` to the topic's `rtk1` subscribers.
    async fn announce(&self, topic: &Arc<str>, change: Change) {
        let frame = match change {
            Change::None => return,
            Change::First(user, info) => event_frame("join", topic, &user, info.as_bytes()),
            Change::Last(user, info) => event_frame("leave", topic, &user, info.as_bytes()),
        };
        self.deliver(topic.clone(), frame).await;
    }

    /// Hands a `join`/`leave` frame to the shards that hold subscribers of `topic`.
    pub(crate) async fn deliver(&self, topic: Arc<str>, frame: Bytes) {
        for shard in routes::selected(&self.shards, self.routes.shards_for(&topic)) {
            let cmd = Command::Presence {
                topic: topic.clone(),
                frame: frame.clone(),
            };
            let _ = shard.send(cmd).await;
        }
    }

    /// Up to about `limit` users of `topic`, from `cursor` (a page's `next`) on.
    pub(crate) async fn list(
        &self,
        topic: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<PresencePage, PresenceError> {
        if !self.enabled(topic) {
            return Err(PresenceError::NotEnabled);
        }
        let limit = limit.clamp(1, MAX_PAGE);
        if let Some(redis) = self.redis() {
            return redis
                .presence_list(topic, cursor.unwrap_or("0"), limit)
                .await
                .map_err(PresenceError::Unavailable);
        }
        let local = self.lock();
        let Some(state) = local.topics.get(topic) else {
            return Ok(PresencePage {
                users: Vec::new(),
                next: None,
            });
        };
        let after = |u: &Arc<str>| cursor.is_none_or(|c| &**u > c);
        let mut users: Vec<PresenceEntry> = state
            .users
            .iter()
            .filter(|(u, _)| after(u))
            .take(limit + 1)
            .map(|(u, s)| PresenceEntry {
                user: u.to_string(),
                connections: s.connections,
                info: serde_json::from_str(&s.info).unwrap_or(serde_json::Value::Null),
            })
            .collect();
        let next = if users.len() > limit {
            users.truncate(limit);
            users.last().map(|u| u.user.clone())
        } else {
            None
        };
        Ok(PresencePage { users, next })
    }

    /// How many users and connections `topic` has: counters, never a listing.
    pub(crate) async fn stats(&self, topic: &str) -> Result<PresenceStats, PresenceError> {
        if !self.enabled(topic) {
            return Err(PresenceError::NotEnabled);
        }
        if let Some(redis) = self.redis() {
            return redis
                .presence_stats(topic)
                .await
                .map_err(PresenceError::Unavailable);
        }
        let local = self.lock();
        Ok(local.topics.get(topic).map_or(
            PresenceStats {
                users: 0,
                connections: 0,
            },
            |s| PresenceStats {
                users: s.users.len() as u64,
                connections: s.conns.len() as u64,
            },
        ))
    }

    /// Graceful shutdown: adds nothing more and, with Redis, removes this instance's entries
    /// at once (the other instances' subscribers get their `leave`s now, not after the TTL).
    pub(crate) async fn shutdown(&self) {
        self.stopped.store(true, Ordering::Release);
        let Some(redis) = self.redis() else { return };
        let topics: Vec<Arc<str>> = self.lock().topics.keys().cloned().collect();
        for topic in topics {
            if let Err(e) = redis.presence_drop(&topic).await {
                tracing::warn!(error = %e, %topic, "presence: could not remove this instance");
            }
        }
    }

    /// With Redis: renews this instance's entries every `every`, and puts back those Redis lost.
    /// Ends when the presence is dropped.
    pub(crate) async fn refresh_periodically(this: std::sync::Weak<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(this) = this.upgrade() else { return };
            if this.stopped.load(Ordering::Acquire) {
                return;
            }
            let Some(redis) = this.redis() else { return };
            let topics: Vec<(Arc<str>, usize)> = this
                .lock()
                .topics
                .iter()
                .map(|(t, s)| (t.clone(), s.conns.len()))
                .collect();
            for (topic, count) in topics {
                match redis.presence_refresh(&topic, count).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // Redis lost this instance's entries (restarted, flushed): put them back.
                        let conns: Vec<(Uuid, Identity)> = {
                            let local = this.lock();
                            local.topics.get(&topic).map_or_else(Vec::new, |s| {
                                s.conns
                                    .iter()
                                    .map(|(c, u)| {
                                        let info = s.users.get(u).map_or_else(
                                            || Arc::from("null"),
                                            |st| st.info.clone(),
                                        );
                                        (
                                            *c,
                                            Identity {
                                                user: u.clone(),
                                                info,
                                            },
                                        )
                                    })
                                    .collect()
                            })
                        };
                        // Concurrently, a chunk at a time: the publisher pipelines them.
                        for chunk in conns.chunks(256) {
                            let adds = chunk
                                .iter()
                                .map(|(conn, who)| redis.presence_add(&topic, *conn, who));
                            futures_util::future::join_all(adds).await;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, %topic, "presence: refresh failed");
                    }
                }
            }
        }
    }
}

/// `{"type":<kind>,"topic":T,"user":U,"info":I}`; `info` as is when it is JSON, else `null`.
pub(crate) fn event_frame(kind: &str, topic: &str, user: &str, info: &[u8]) -> Bytes {
    let info: &[u8] = if crate::wire::is_json(info) {
        info
    } else {
        b"null"
    };
    let json = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut out = Vec::with_capacity(64 + topic.len() + user.len() + info.len());
    out.extend_from_slice(br#"{"type":""#);
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(br#"","topic":"#);
    out.extend_from_slice(json(topic).as_bytes());
    out.extend_from_slice(br#","user":"#);
    out.extend_from_slice(json(user).as_bytes());
    out.extend_from_slice(br#","info":"#);
    out.extend_from_slice(info);
    out.push(b'}');
    frame::encode_text(&out)
}

/// The frame of a presence event Redis published on `topic`'s channel.
pub(crate) fn event_frame_from_redis(topic: &str, message: &[u8]) -> Option<Bytes> {
    let (kind, user, info) = crate::broker::parse_presence_event(message)?;
    Some(event_frame(kind, topic, user, info))
}

/// `{"type":"presence","topic":T,"users":[{"user":U,"connections":N,"info":I}…]}`.
pub(crate) fn reply_frame(topic: &str, users: &[PresenceEntry]) -> Bytes {
    let json = serde_json::json!({ "type": "presence", "topic": topic, "users": users });
    frame::encode_text(json.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(user: &str) -> Identity {
        Identity::new(user.into(), &serde_json::json!({ "name": user }))
    }

    #[test]
    fn a_user_joins_with_the_first_connection_and_leaves_with_the_last() {
        let mut local = Local::default();
        let topic: Arc<str> = Arc::from("t");
        let (c1, c2) = (Uuid::from_u64_pair(0, 1), Uuid::from_u64_pair(0, 2));
        assert!(matches!(
            local.add(&topic, c1, &who("alice")),
            Some(Change::First(..))
        ));
        assert_eq!(local.add(&topic, c1, &who("alice")), None, "twice is once");
        assert_eq!(local.add(&topic, c2, &who("alice")), Some(Change::None));
        assert_eq!(local.remove("t", c1), Some(Change::None));
        assert_eq!(local.remove("t", c1), None);
        assert!(matches!(local.remove("t", c2), Some(Change::Last(..))));
        assert!(local.topics.is_empty() && local.by_conn.is_empty());
    }

    #[tokio::test]
    async fn events_go_only_to_the_shards_that_hold_the_topic() {
        let (txs, mut rxs): (Vec<_>, Vec<_>) = (0..3).map(|_| mpsc::channel(8)).unzip();
        let (published, _keep) = mpsc::channel(1);
        let routes = Arc::new(Routes::new(3, None));
        let presence = Presence::new(
            None,
            txs.into(),
            routes.clone(),
            BrokerHandle::Local(crate::broker::local::LocalBroker::new(published, false)),
            Duration::ZERO,
        );
        let topic: Arc<str> = Arc::from("room");
        let received = |rxs: &mut Vec<mpsc::Receiver<Command>>| -> Vec<usize> {
            let mut got = Vec::new();
            for (i, rx) in rxs.iter_mut().enumerate() {
                while let Ok(cmd) = rx.try_recv() {
                    assert!(matches!(cmd, Command::Presence { .. }));
                    got.push(i);
                }
            }
            got
        };

        presence
            .deliver(topic.clone(), Bytes::from_static(b"x"))
            .await;
        assert_eq!(received(&mut rxs), Vec::<usize>::new(), "no shard holds it");

        routes.add(&topic, 1);
        presence
            .deliver(topic.clone(), Bytes::from_static(b"x"))
            .await;
        assert_eq!(received(&mut rxs), vec![1]);

        // While a subscribe is on its way, every shard gets the event.
        let expected = routes.expect(&topic);
        presence
            .deliver(topic.clone(), Bytes::from_static(b"x"))
            .await;
        assert_eq!(received(&mut rxs), vec![0, 1, 2]);
        drop(expected);
        presence
            .deliver(topic.clone(), Bytes::from_static(b"x"))
            .await;
        assert_eq!(received(&mut rxs), vec![1]);
    }

    #[test]
    fn event_frames_carry_info_as_json() {
        let f = event_frame("join", "general", "al\"ice", br#"{"name":"Al"}"#);
        let v: serde_json::Value =
            serde_json::from_slice(frame::encoded_payload(&f).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"join","topic":"general","user":"al\"ice","info":{"name":"Al"}})
        );
        let f = event_frame("leave", "general", "bob", b"{not json");
        let v: serde_json::Value =
            serde_json::from_slice(frame::encoded_payload(&f).unwrap()).unwrap();
        assert_eq!(v["info"], serde_json::Value::Null);
    }
}
