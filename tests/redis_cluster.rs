//! Redis Cluster: instances that share a cluster through `redis+cluster://`, with sharded
//! Pub/Sub. Each test starts its own three-primary cluster (see `support::redis_cluster`).
//! Publications are counted by the sequence number inside the payload.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum_realtime_kit::{TopicPolicy, WebsocketServiceBuilder};
use serde_json::json;
use support::chat::ChatHandler;
use support::redis_cluster::{CLUSTER_WAIT, RedisCluster, key_slot, start_cluster};
use support::rtk1::{Received, follow, rtk1};
use support::{Client, Server, serve_chat};

/// An instance on `url`: two shards, every topic open to `subscribe` commands, and topics
/// starting with `pos` keeping 5 000 publications for a minute.
async fn instance(url: String) -> Server {
    instance_with(url, |b| b).await
}

/// [`instance`], with `configure` applied to its builder last.
async fn instance_with(
    url: String,
    configure: impl FnOnce(WebsocketServiceBuilder<ChatHandler>) -> WebsocketServiceBuilder<ChatHandler>,
) -> Server {
    let policy = TopicPolicy::history(5_000, Duration::from_secs(60));
    let builder = support::chat::builder()
        .shards(2)
        .recovery_max_publications(5_000)
        .topic_policy(move |topic| topic.starts_with("pos").then(|| policy.clone()))
        .authorize_topics(|_, _, _: String| async { Ok::<(), axum::http::StatusCode>(()) })
        .redis_url(Some(url));
    let service = configure(builder).build();
    let server = serve_chat(service).await;
    support::wait_ready_within(&server.service, CLUSTER_WAIT).await;
    server
}

/// Waits up to [`CLUSTER_WAIT`] for `cond`.
async fn wait_long(what: &str, cond: impl FnMut() -> bool) {
    support::wait_until_within(what, CLUSTER_WAIT, cond).await;
}

/// One `rtk1` connection to `addr` subscribed to every topic of `topics` (the first through the
/// URL, the others with `subscribe` commands), once each has been confirmed.
async fn subscribe_all(addr: SocketAddr, topics: &[String]) -> Client {
    let mut c = rtk1(addr, &topics[0], None).await;
    for topic in &topics[1..] {
        c.send_text(&json!({"type": "subscribe", "topic": topic}).to_string())
            .await;
    }
    let mut pending: HashSet<&str> = topics.iter().map(String::as_str).collect();
    while !pending.is_empty() {
        let m = c.recv_json().await;
        assert_eq!(m["type"], "subscribed", "{m}");
        let topic = m["topic"].as_str().expect("a topic");
        assert!(pending.remove(topic), "unexpected {m}");
    }
    c
}

/// What the clients of one instance received, per topic: the payloads' `n` in arrival order, and
/// the highest probe round seen.
#[derive(Default)]
struct Inbox {
    ns: HashMap<String, Vec<u64>>,
    probes: HashMap<String, u64>,
}

type Shared = Arc<Mutex<Inbox>>;

/// Reads `c` into `inbox` until `stop`; a connection that ends fails the test (no client may
/// reconnect). Plain topics only: an `insufficient_state` fails the test too.
fn read_into(mut c: Client, inbox: Shared, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Acquire) {
            let Ok(m) = tokio::time::timeout(Duration::from_millis(100), c.recv_json()).await
            else {
                continue;
            };
            assert_eq!(m["type"], "pub", "unexpected frame {m}");
            let topic = m["topic"].as_str().expect("a topic").to_owned();
            let mut inbox = inbox.lock().unwrap();
            if let Some(n) = m["d"]["n"].as_u64() {
                inbox.ns.entry(topic).or_default().push(n);
            } else if let Some(r) = m["d"]["probe"].as_u64() {
                let seen = inbox.probes.entry(topic).or_default();
                *seen = (*seen).max(r);
            } else {
                panic!("unexpected payload {m}");
            }
        }
    })
}

/// Publishes probe `round` on each of `topics` through `on`, again every 200 ms on those whose
/// probe has not arrived yet, until every one has: then every topic's subscription is in place
/// on every node. Publish errors are tolerated here (a node coming back).
async fn probe_until_delivered(on: &Server, inbox: &Shared, topics: &[String], round: u64) {
    let payload = json!({ "probe": round }).to_string();
    let ok = tokio::time::timeout(CLUSTER_WAIT, async {
        loop {
            let missing: Vec<&String> = {
                let inbox = inbox.lock().unwrap();
                topics
                    .iter()
                    .filter(|t| inbox.probes.get(*t).is_none_or(|r| *r < round))
                    .collect()
            };
            if missing.is_empty() {
                return;
            }
            for topic in missing {
                let _ = on.service.publish_raw(topic, payload.clone()).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "probes never reached every topic's subscribers");
}

/// Publishes `{"n":n}` on every topic at once; returns the topics whose publish failed, after
/// checking each failure is a retryable error.
async fn publish_round(on: &Server, topics: &[String], n: u64) -> HashSet<String> {
    let mut set = tokio::task::JoinSet::new();
    for topic in topics {
        let (service, topic) = (on.service.clone(), topic.clone());
        set.spawn(async move {
            let r = tokio::time::timeout(
                support::WAIT,
                service.publish_raw(&topic, json!({ "n": n }).to_string()),
            )
            .await
            .unwrap_or_else(|_| panic!("a publish on {topic} never returned"));
            (topic, r)
        });
    }
    let mut failed = HashSet::new();
    while let Some(done) = set.join_next().await {
        let (topic, r) = done.unwrap();
        if let Err(e) = r {
            assert!(e.is_retryable(), "publish on {topic}: {e} is not retryable");
            assert!(!e.to_string().is_empty());
            failed.insert(topic);
        }
    }
    failed
}

/// `count` topic names, `t0`, `t1`, …
fn topics(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("t{i}")).collect()
}

/// Subscribes `topics` on `addr`, 100 per connection, each connection read into one inbox.
async fn subscribers(
    addr: SocketAddr,
    topics: &[String],
    stop: &Arc<AtomicBool>,
) -> (Shared, Vec<tokio::task::JoinHandle<()>>) {
    let inbox = Shared::default();
    let mut readers = Vec::new();
    for chunk in topics.chunks(100) {
        let c = subscribe_all(addr, chunk).await;
        readers.push(read_into(c, inbox.clone(), stop.clone()));
    }
    (inbox, readers)
}

/// Stops the readers; a reader that failed (its connection ended) fails the test.
async fn stop_readers(stop: &AtomicBool, readers: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for reader in readers {
        reader.await.expect("a client's connection failed");
    }
}

/// The topics of `topics` whose inbox lacks `n`.
fn lacking(inbox: &Shared, topics: &[String], n: u64) -> Vec<String> {
    let inbox = inbox.lock().unwrap();
    topics
        .iter()
        .filter(|t| !inbox.ns.get(*t).is_some_and(|ns| ns.contains(&n)))
        .cloned()
        .collect()
}

/// Keys named `k0`, `k1`, … until one lands on each node: `(key, node)` pairs, in node order.
fn one_key_per_node(cluster: &RedisCluster) -> Vec<(String, usize)> {
    let mut found: Vec<Option<String>> = vec![None; cluster.len()];
    for n in 0.. {
        let key = format!("k{n}");
        let owner = cluster.key_owner(&key);
        found[owner].get_or_insert(key);
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found.into_iter().flatten().zip(0..).collect()
}

#[test]
fn the_test_cluster_forms_and_moves_a_slot_with_its_keys() {
    let Some(cluster) = start_cluster("the_test_cluster_forms") else {
        return;
    };
    // The fixture's slot function agrees with the server's.
    for key in [
        "k0",
        "topic:general",
        "{p17}x",
        "a{}b",
        "{}",
        "user{42}:inbox",
    ] {
        let slot = cluster.cli(0, &["CLUSTER", "KEYSLOT", key]);
        assert_eq!(slot, key_slot(key).to_string(), "slot of {key}");
    }
    let keys = one_key_per_node(&cluster);
    for (key, node) in &keys {
        assert_eq!(cluster.cli(*node, &["SET", key, &format!("v-{key}")]), "OK");
    }
    // Node 0's key, with two more keys in its slot, moves to node 1.
    let (key, from) = (&keys[0].0, keys[0].1);
    let slot = key_slot(key);
    let tag = format!("{{{key}}}");
    for extra in ["a", "b"] {
        let k = format!("{tag}{extra}");
        assert_eq!(key_slot(&k), slot);
        assert_eq!(cluster.cli(from, &["SET", &k, extra]), "OK");
    }
    cluster.move_slot(slot, from, 1);
    assert_eq!(cluster.slot_owner(slot), 1);
    for i in 0..cluster.len() {
        assert_eq!(cluster.slot_owner(slot), 1, "node {i}'s view");
    }
    assert_eq!(cluster.cli(1, &["GET", key]), format!("v-{key}"));
    assert_eq!(cluster.cli(1, &["GET", &format!("{tag}a")]), "a");
    assert_eq!(cluster.cli(1, &["GET", &format!("{tag}b")]), "b");
    assert_eq!(cluster.cli(from, &["DBSIZE"]), "0");
    // The other nodes' keys stayed where they were.
    for (key, node) in &keys[1..] {
        assert_eq!(cluster.cli(*node, &["GET", key]), format!("v-{key}"));
    }
    assert!(cluster.info_cpu(0) > 0.0);
}

#[test]
fn the_test_cluster_serves_on_without_a_stopped_primary_and_takes_it_back() {
    let Some(mut cluster) = start_cluster("the_test_cluster_serves_on") else {
        return;
    };
    let keys = one_key_per_node(&cluster);
    cluster.stop(2);
    assert!(!cluster.is_running(2));
    for (key, node) in &keys[..2] {
        assert_eq!(cluster.cli(*node, &["SET", key, "up"]), "OK");
    }
    let info = cluster.cli(0, &["CLUSTER", "INFO"]);
    assert!(info.contains("cluster_state:ok"), "{info}");
    cluster.restart(2);
    let (key, node) = &keys[2];
    assert_eq!(*node, 2);
    assert_eq!(cluster.slot_owner(key_slot(key)), 2);
    assert_eq!(cluster.cli(2, &["SET", key, "back"]), "OK");
}

/// Two instances on one cluster: 1 000 topics subscribed on A spread over the three primaries (each
/// holds shard channels, none holds a classic channel), and 5 publications per topic through B
/// arrive exactly once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_exchange_messages_on_a_thousand_topics_over_every_node() {
    const PER_TOPIC: u64 = 5;
    let Some(cluster) = start_cluster("two_instances_exchange_messages_on_a_thousand_topics")
    else {
        return;
    };
    let a = instance(cluster.url()).await;
    let b = instance(cluster.url()).await;
    let all = topics(1_000);
    let stop = Arc::new(AtomicBool::new(false));
    let (inbox, readers) = subscribers(a.addr, &all, &stop).await;
    probe_until_delivered(&b, &inbox, &all, 1).await;

    tokio::task::block_in_place(|| {
        for i in 0..cluster.len() {
            let shard = cluster.shard_channels(i);
            assert!(!shard.is_empty(), "node {i} serves no topic");
            for channel in &shard {
                assert_eq!(cluster.key_owner(channel), i, "{channel} on node {i}");
            }
            let classic = cluster.cli(i, &["PUBSUB", "CHANNELS"]);
            assert!(
                classic.is_empty(),
                "node {i} has classic channels: {classic}"
            );
        }
    });

    for n in 1..=PER_TOPIC {
        let failed = publish_round(&b, &all, n).await;
        assert!(failed.is_empty(), "publishes failed on {failed:?}");
    }
    let inbox2 = inbox.clone();
    let all2 = all.clone();
    wait_long("every publication delivered", move || {
        lacking(&inbox2, &all2, PER_TOPIC).is_empty()
    })
    .await;
    stop_readers(&stop, readers).await;
    let want: Vec<u64> = (1..=PER_TOPIC).collect();
    let inbox = inbox.lock().unwrap();
    for topic in &all {
        assert_eq!(inbox.ns.get(topic), Some(&want), "topic {topic}");
    }
    assert_eq!(a.service.metrics().broker_reconnects, 0);
}

/// The slot of a positioned topic's history (its partition's hash slot) and the node that owns
/// it, found by looking for its keys on every node.
fn history_slot(cluster: &RedisCluster, topic: &str) -> (u16, usize) {
    let pattern = format!("*{topic}*");
    for i in 0..cluster.len() {
        let keys = cluster.cli(i, &["KEYS", &pattern]);
        if let Some(key) = keys.lines().find(|k| !k.is_empty()) {
            let slot = key_slot(key);
            assert_eq!(cluster.slot_owner(slot), i);
            return (slot, i);
        }
    }
    panic!("no key of {topic} on any node");
}

/// A positioned topic's slot (history and shard channel) migrates twice, live, while about 500
/// publications a second flow through instance B to `rtk1` clients on both instances: delivery
/// goes on, no client reconnects, no publish fails, and every client has every acknowledged
/// publication exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_slot_migrates_under_flow_without_loss_or_reconnects() {
    const TOPIC: &str = "pos-mig";
    let Some(cluster) = start_cluster("a_busy_slot_migrates_under_flow") else {
        return;
    };
    let a = instance(cluster.url()).await;
    let b = instance(cluster.url()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut received = Vec::new();
    let mut readers = Vec::new();
    for addr in [a.addr, a.addr, b.addr] {
        let mut c = subscribe_all(addr, &[TOPIC.to_owned()]).await;
        c.assert_nothing_pending().await;
        let seen = Arc::new(Mutex::new(Received::default()));
        received.push(seen.clone());
        readers.push(follow(c, TOPIC, seen, stop.clone()));
    }
    let opened = a.service.metrics().connections_opened + b.service.metrics().connections_opened;

    // About 500 publications a second through B, each awaited; `acked` holds those that got a
    // position, `failed` counts the others.
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let publishing = {
        let (service, acked, failed) = (b.service.clone(), acked.clone(), failed.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            for n in 1u64.. {
                tick.tick().await;
                match service.publish(TOPIC, &json!({ "n": n })).await {
                    Ok(Some(_)) => acked.lock().unwrap().push(n),
                    Ok(None) => failed.lock().unwrap().push(format!("{n}: no position")),
                    Err(e) => failed.lock().unwrap().push(format!("{n}: {e}")),
                }
            }
        })
    };
    let count = |acked: &Mutex<Vec<u64>>| acked.lock().unwrap().len();
    wait_long("publications flow", || count(&acked) >= 200).await;

    let (slot, first) = tokio::task::block_in_place(|| history_slot(&cluster, TOPIC));
    tokio::task::block_in_place(|| {
        let channels = cluster.shard_channels(first);
        assert!(
            channels.iter().any(|c| key_slot(c) == slot),
            "no shard channel in slot {slot} on node {first}: {channels:?}"
        );
    });
    let mut owner = first;
    for _ in 0..2 {
        let to = (owner + 1) % cluster.len();
        tokio::task::block_in_place(|| cluster.move_slot(slot, owner, to));
        owner = to;
        let before = count(&acked);
        wait_long("publications flow after the migration", || {
            count(&acked) >= before + 300
        })
        .await;
    }
    publishing.abort();
    let _ = publishing.await;

    let acked = acked.lock().unwrap().clone();
    let last = *acked.last().unwrap();
    for (i, seen) in received.iter().enumerate() {
        let seen = seen.clone();
        wait_long(
            &format!("client {i} to have publication {last}"),
            move || seen.lock().unwrap().ns.contains(&last),
        )
        .await;
    }
    stop_readers(&stop, readers).await;
    for (i, seen) in received.iter().enumerate() {
        let seen = seen.lock().unwrap();
        for w in seen.ns.windows(2) {
            assert!(w[1] > w[0], "client {i}: {} after {}", w[1], w[0]);
        }
        let have: HashSet<u64> = seen.ns.iter().copied().collect();
        let missing: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|n| !have.contains(n))
            .collect();
        assert!(
            missing.is_empty(),
            "client {i} lacks acknowledged publications {missing:?} (a recovery refused: {})",
            seen.refused
        );
    }
    let now = a.service.metrics().connections_opened + b.service.metrics().connections_opened;
    assert_eq!(now, opened, "clients reconnected");
    let failed = failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "publishes failed during the migration: {failed:?}"
    );
}

/// A stopped primary: publishes on its partitions fail with a retryable error (the same topics
/// each time) while those on the other primaries are delivered; once it is back, its topics are
/// delivered again, and every topic gets a last publication exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_primary_fails_only_its_partitions_and_recovers_after_restart() {
    let Some(mut cluster) = start_cluster("a_stopped_primary_fails_only_its_partitions") else {
        return;
    };
    let a = instance(cluster.url()).await;
    let b = instance(cluster.url()).await;
    let all = topics(300);
    let stop = Arc::new(AtomicBool::new(false));
    let (inbox, readers) = subscribers(a.addr, &all, &stop).await;
    probe_until_delivered(&b, &inbox, &all, 1).await;

    tokio::task::block_in_place(|| cluster.stop(2));
    let down = publish_round(&b, &all, 1).await;
    assert!(!down.is_empty(), "no publish failed with a primary down");
    assert!(
        down.len() < all.len(),
        "every publish failed with one primary of three down"
    );
    let again = publish_round(&b, &all, 2).await;
    assert_eq!(
        again, down,
        "the failing topics changed while the primary stayed down"
    );
    let up: Vec<String> = all.iter().filter(|t| !down.contains(*t)).cloned().collect();
    let (inbox2, up2) = (inbox.clone(), up.clone());
    wait_long("the other primaries' topics delivered", move || {
        lacking(&inbox2, &up2, 2).is_empty()
    })
    .await;

    tokio::task::block_in_place(|| cluster.restart(2));
    let down: Vec<String> = down.into_iter().collect();
    probe_until_delivered(&b, &inbox, &down, 2).await;
    let failed = publish_round(&b, &all, 3).await;
    assert!(
        failed.is_empty(),
        "publishes failed after the restart on {failed:?}"
    );
    let (inbox2, all2) = (inbox.clone(), all.clone());
    wait_long("every topic's last publication", move || {
        lacking(&inbox2, &all2, 3).is_empty()
    })
    .await;
    stop_readers(&stop, readers).await;
    let inbox = inbox.lock().unwrap();
    for topic in &up {
        assert_eq!(inbox.ns.get(topic), Some(&vec![1, 2, 3]), "topic {topic}");
    }
    for topic in &down {
        assert_eq!(inbox.ns.get(topic), Some(&vec![3]), "topic {topic}");
    }
}
