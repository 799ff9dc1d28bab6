//! Which shards hold subscribers of each topic, so a publication is sent only to those; and
//! which topics have no policy, so their publications may skip the dispatcher.
//!
//! Connections are spread over the shards by id, not by topic, so a topic with one subscriber
//! (a per-user channel) lives in one shard. Sending its publications to every shard would wake
//! each shard task for a map lookup that finds nothing: with two shards, half the shard
//! wake-ups of such a workload do no work. [`Routes`] keeps, per topic, the set of shards that
//! have it in their map, and the task forwarding a publication (the dispatcher, or for a topic
//! without a policy the Redis subscriber task that received it) sends it to that set.
//!
//! # Why no publication is lost to a stale set
//! A shard sets its bit when a topic gains its first subscriber there and clears it when the
//! topic loses its last, both while applying the command, before the subscriber is told it
//! joined: a publication received after a join returned sees the bit. A join
//! the dispatcher itself sends (an `rtk1` subscribe carrying recovered publications) must also
//! receive every publication dispatched after it, before the shard has applied it: from the
//! moment a subscribe is sent until its shard applies it, the topic is *expected* ([`Expected`])
//! and its publications go to every shard, as without routes.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ahash::AHashMap;

use crate::history::PolicyRule;
use crate::shard::TopicInterest;
use crate::shrink::ShrinkWhenSparse;

/// Every shard.
pub(crate) const ALL: u64 = u64::MAX;

/// The routes of one topic.
#[derive(Debug, Default, Clone, Copy)]
struct Route {
    /// Bit `i` set: shard `i` has at least one subscriber of the topic.
    shards: u64,
    /// Subscribes sent to a shard and not yet applied there.
    expected: u32,
    /// The topic has no policy (no history, no presence): see [`Routes::direct`].
    plain: bool,
}

impl Route {
    /// The shards its publications go to: every one while a subscribe is on its way.
    fn shards(&self) -> u64 {
        if self.expected > 0 { ALL } else { self.shards }
    }
}

/// Topic → the shards to send its publications to. Shared by the shards (which set and clear
/// their bits), the senders of subscribes and the tasks forwarding publications (which read it
/// once per publication).
pub(crate) struct Routes {
    /// `None`: every publication goes to every shard (more shards than bits, or a dispatcher
    /// driven without shards).
    map: Option<Mutex<AHashMap<Arc<str>, Route>>>,
    /// The application's topic policies, if it has any: asked once per route, when a topic
    /// gets one.
    rule: Option<PolicyRule>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("map", &self.map)
            .field("rule", &self.rule.is_some())
            .finish()
    }
}

impl Routes {
    /// Routes for `shards` shards; with more than 64, every publication goes to every shard.
    /// `rule` tells which topics have a policy ([`direct`](Self::direct)).
    pub(crate) fn new(shards: usize, rule: Option<PolicyRule>) -> Self {
        Self {
            map: (shards <= 64).then(|| Mutex::new(AHashMap::new())),
            rule,
        }
    }

    /// Routes that send every publication to every shard.
    pub(crate) fn everywhere() -> Self {
        Self {
            map: None,
            rule: None,
        }
    }

    /// Whether `topic` has no policy.
    fn is_plain(&self, topic: &str) -> bool {
        self.rule.as_ref().is_none_or(|rule| rule(topic).is_none())
    }

    fn lock(map: &Mutex<AHashMap<Arc<str>, Route>>) -> MutexGuard<'_, AHashMap<Arc<str>, Route>> {
        // The map is consistent after every statement that changes it.
        map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The shards to send a publication of `topic` to, as bits ([`ALL`] while a subscribe to
    /// it is on its way).
    pub(crate) fn shards_for(&self, topic: &str) -> u64 {
        let Some(map) = &self.map else {
            return ALL;
        };
        Self::lock(map).get(topic).map_or(0, Route::shards)
    }

    /// For a publication of a topic without a policy, the shards to send it to (as
    /// [`shards_for`](Self::shards_for)); `None` for a topic with one, or if every publication
    /// goes to every shard. Such a publication needs nothing of the dispatcher but its frame and
    /// these shards, so whoever received it may deliver it: every publication of the topic takes
    /// the same way, which keeps their order.
    pub(crate) fn direct(&self, topic: &str) -> Option<u64> {
        let map = self.map.as_ref()?;
        if self.rule.is_none() {
            return Some(self.shards_for(topic));
        }
        if let Some(route) = Self::lock(map).get(topic) {
            return route.plain.then(|| route.shards());
        }
        // Nobody here subscribes to it: there is nothing to deliver, but a topic with history
        // keeps its publications in the dispatcher's cache all the same.
        self.is_plain(topic).then_some(0)
    }

    /// Shard `shard` has its first subscriber of `topic`.
    pub(crate) fn add(&self, topic: &Arc<str>, shard: usize) {
        self.update(topic, |r| r.shards |= bit(shard));
    }

    /// Shard `shard` has lost its last subscriber of `topic`.
    pub(crate) fn remove(&self, topic: &Arc<str>, shard: usize) {
        self.update(topic, |r| r.shards &= !bit(shard));
    }

    /// A subscribe to `topic` is about to be sent to a shard: until the returned guard is
    /// dropped (by that shard once it applied the subscribe, or with the command if it is never
    /// sent), every shard gets the topic's publications.
    pub(crate) fn expect(self: &Arc<Self>, topic: &Arc<str>) -> Expected {
        self.update(topic, |r| r.expected += 1);
        Expected {
            routes: self.clone(),
            topic: topic.clone(),
        }
    }

    fn update(&self, topic: &Arc<str>, change: impl FnOnce(&mut Route)) {
        let Some(map) = &self.map else {
            return;
        };
        let mut routes = Self::lock(map);
        // Read only if the topic has no route yet.
        let mut plain = true;
        if !routes.contains_key(topic) {
            // The rule is the application's code: it runs outside the lock.
            drop(routes);
            plain = self.is_plain(topic);
            routes = Self::lock(map);
        }
        let route = routes.entry(topic.clone()).or_insert(Route {
            plain,
            ..Route::default()
        });
        change(route);
        if route.shards == 0 && route.expected == 0 {
            routes.remove(topic);
            routes.shrink_when_sparse();
        }
    }

    /// How many topics have routes.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| Self::lock(m).len())
    }
}

/// The shards (their senders, in shard order) that the bits `to` (from
/// [`Routes::shards_for`]) name.
pub(crate) fn selected<T>(shards: &[T], to: u64) -> impl Iterator<Item = &T> {
    shards
        .iter()
        .enumerate()
        .filter(move |&(i, _)| to == ALL || to & bit(i) != 0)
        .map(|(_, shard)| shard)
}

fn bit(shard: usize) -> u64 {
    1u64.checked_shl(shard as u32).unwrap_or(0)
}

/// A subscribe on its way to its shard (see [`Routes::expect`]); travels in the command and
/// is dropped by the shard once applied.
#[derive(Debug)]
pub(crate) struct Expected {
    routes: Arc<Routes>,
    topic: Arc<str>,
}

impl Drop for Expected {
    fn drop(&mut self) {
        self.routes
            .update(&self.topic, |r| r.expected = r.expected.saturating_sub(1));
    }
}

/// One shard's [`TopicInterest`]: sets and clears the shard's route, then tells the broker.
pub(crate) struct Routed {
    pub(crate) routes: Arc<Routes>,
    pub(crate) shard: usize,
    pub(crate) broker: Arc<dyn TopicInterest>,
}

impl TopicInterest for Routed {
    fn first_in_shard(&self, topic: &Arc<str>) {
        self.routes.add(topic, self.shard);
        self.broker.first_in_shard(topic);
    }

    fn last_in_shard(&self, topic: &Arc<str>) {
        self.routes.remove(topic, self.shard);
        self.broker.last_in_shard(topic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[test]
    fn a_publication_goes_to_the_shards_that_hold_the_topic() {
        let routes = Routes::new(4, None);
        let t = topic("user:1");
        assert_eq!(routes.shards_for("user:1"), 0, "nobody subscribed");
        routes.add(&t, 2);
        assert_eq!(routes.shards_for("user:1"), 0b100);
        routes.add(&t, 0);
        assert_eq!(routes.shards_for("user:1"), 0b101);
        routes.remove(&t, 2);
        assert_eq!(routes.shards_for("user:1"), 0b001);
        routes.remove(&t, 0);
        assert_eq!(routes.shards_for("user:1"), 0);
        assert_eq!(routes.len(), 0, "an empty topic leaves no entry");
    }

    #[test]
    fn an_expected_subscribe_sends_to_every_shard_until_it_is_applied() {
        let routes = Arc::new(Routes::new(2, None));
        let t = topic("room");
        routes.add(&t, 1);
        let expected = routes.expect(&t);
        // The shard applying it may first drop the topic's last subscriber there: the bit goes,
        // the publications still reach the shard the subscribe is queued in.
        routes.remove(&t, 1);
        assert_eq!(routes.shards_for("room"), ALL);
        routes.add(&t, 0);
        drop(expected);
        assert_eq!(routes.shards_for("room"), 0b01);
    }

    #[test]
    fn a_subscribe_dropped_unsent_leaves_nothing_behind() {
        let routes = Arc::new(Routes::new(2, None));
        drop(routes.expect(&topic("room")));
        assert_eq!(routes.shards_for("room"), 0);
        assert_eq!(routes.len(), 0);
    }

    /// The shard's own bookkeeping sets and clears its route, and still tells the broker.
    #[test]
    fn a_shard_routes_a_topic_from_its_first_subscriber_to_its_last() {
        use crate::outbound::Conn;
        use crate::shard::{Command, Shard};

        let routes = Arc::new(Routes::new(2, None));
        let broker = Arc::new(Counting::default());
        let interest = Arc::new(Routed {
            routes: routes.clone(),
            shard: 1,
            broker: broker.clone(),
        });
        let mut shard = Shard::detached(interest, Arc::default());
        let conn = |id| {
            let policy = crate::SlowConsumerPolicy::Close;
            Arc::new(Conn::new(uuid::Uuid::from_u128(id), 1, 1 << 20, policy))
        };
        let (a, b) = (conn(1), conn(2));
        assert!(shard.subscribe(a.clone(), topic("t")));
        assert!(shard.subscribe(b.clone(), topic("t")));
        assert_eq!(routes.shards_for("t"), 0b10);
        for conn_id in [a.id, b.id] {
            shard.apply(Command::Unsubscribe {
                conn_id,
                topic: topic("t"),
            });
        }
        assert_eq!(routes.shards_for("t"), 0);
        assert_eq!(
            *broker.0.lock().unwrap(),
            (1, 1),
            "first and last, once each"
        );
    }

    /// Counts the broker's first/last calls.
    #[derive(Default)]
    struct Counting(Mutex<(u32, u32)>);

    impl TopicInterest for Counting {
        fn first_in_shard(&self, _: &Arc<str>) {
            self.0.lock().unwrap().0 += 1;
        }
        fn last_in_shard(&self, _: &Arc<str>) {
            self.0.lock().unwrap().1 += 1;
        }
    }

    /// A topic without a policy may skip the dispatcher; one with a policy never does, whether
    /// or not it has subscribers here. The rule is asked once per route, not per publication.
    #[test]
    fn only_topics_without_a_policy_are_delivered_directly() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = asked.clone();
        let rule: PolicyRule = Arc::new(move |topic: &str| {
            counter.fetch_add(1, Ordering::Relaxed);
            let policy = crate::TopicPolicy::history(10, std::time::Duration::from_secs(1));
            topic.starts_with("pos").then_some(policy)
        });
        let routes = Arc::new(Routes::new(2, Some(rule)));
        assert_eq!(routes.direct("user:1"), Some(0), "plain, nobody here");
        assert_eq!(
            routes.direct("pos-a"),
            None,
            "history is kept without subscribers"
        );
        let (plain, positioned) = (topic("user:1"), topic("pos-a"));
        routes.add(&plain, 1);
        routes.add(&positioned, 1);
        let before = asked.load(Ordering::Relaxed);
        for _ in 0..10 {
            assert_eq!(routes.direct("user:1"), Some(0b10));
            assert_eq!(routes.direct("pos-a"), None);
        }
        assert_eq!(asked.load(Ordering::Relaxed), before, "decided when routed");
        let expected = routes.expect(&plain);
        assert_eq!(routes.direct("user:1"), Some(ALL));
        drop(expected);
        assert_eq!(
            Routes::new(2, None).direct("pos-a"),
            Some(0),
            "no rule, no policy"
        );
        assert_eq!(Routes::new(65, None).direct("user:1"), None, "no map");
    }

    #[test]
    fn without_a_map_every_shard_gets_every_publication() {
        let routes = Routes::new(65, None);
        routes.add(&topic("t"), 64);
        assert_eq!(routes.shards_for("t"), ALL);
        assert_eq!(Routes::everywhere().shards_for("t"), ALL);
    }
}
