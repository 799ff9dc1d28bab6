//! Positioned topics over Redis, each test with its own redis-server: Redis assigns the
//! positions, every instance delivers them, and recovery works on any instance, from what it
//! received or from the Redis stream. Publications are counted by offset and by the sequence
//! number inside the payload.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum_realtime_kit::{Position, TopicPolicy, WebsocketServiceBuilder};
use serde_json::{Value, json};
use support::chat::ChatHandler;
use support::redis_server::{Listen, start_redis, start_redis_with, start_sentinel};
use support::rtk1::{Received, follow, next_pub, rtk1, rtk1_subscribed, subscribed};
use support::{BOB, Client, Server, serve_chat};

/// An instance on `url` whose topics starting with `pos` keep 5 000 publications for a minute
/// (those starting with `pos-ttl`, 100 for 200 ms).
async fn instance(url: String) -> Server {
    instance_with(url, |b| b).await
}

/// [`instance`], caching at most `bytes` of history in memory.
async fn instance_caching(url: String, bytes: usize) -> Server {
    instance_with(url, move |b| b.history_max_bytes(bytes)).await
}

/// [`instance`], with `configure` applied to its builder last.
async fn instance_with(
    url: String,
    configure: impl FnOnce(WebsocketServiceBuilder<ChatHandler>) -> WebsocketServiceBuilder<ChatHandler>,
) -> Server {
    let policy = TopicPolicy::history(5_000, Duration::from_secs(60));
    let short = TopicPolicy::history(100, Duration::from_millis(200));
    let builder = support::chat::builder()
        .shards(2)
        .history_max_bytes(64 << 20)
        .recovery_max_publications(1_000)
        .topic_policy(move |topic| {
            if topic.starts_with("pos-ttl") {
                Some(short.clone())
            } else {
                topic.starts_with("pos").then(|| policy.clone())
            }
        })
        .redis_url(Some(url));
    let service = configure(builder).build();
    let server = serve_chat(service).await;
    support::wait_ready(&server.service).await;
    server
}

/// Publishes `{"n":<n>}` to `topic` through `on`; the topic keeps history, so it gets a
/// position.
async fn publish_n(on: &Server, topic: &str, n: u64) -> Position {
    on.service
        .publish(topic, &json!({ "n": n }))
        .await
        .unwrap()
        .expect("a position")
}

/// The next frame, which must be the text frame `{"n":<n>}` exactly as published.
async fn verbatim(c: &mut Client, n: u64) {
    let f = c.recv_frame().await.expect("a frame");
    assert_eq!(f.opcode, 0x1);
    assert_eq!(
        String::from_utf8(f.payload).unwrap(),
        format!("{{\"n\":{n}}}")
    );
}

/// Publications on instance B get positions from Redis, in order, with one epoch; a client on
/// instance A receives them with those positions, drops, misses 500 published on B and
/// reconnects to B with its position: it gets exactly those 500, in order, then live ones.
/// Plain clients get the payloads verbatim, and a payload another program PUBLISHes on the
/// channel reaches both without a position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_come_from_redis_and_a_client_recovers_on_another_instance() {
    let Some(redis) = start_redis("positions_come_from_redis_and_a_client_recovers") else {
        return;
    };
    let a = instance(redis.url()).await;
    let b = instance(redis.url()).await;
    let mut plain = support::connect(a.addr, "pos-r", BOB).await;
    let mut plain_b = support::connect(b.addr, "pos-r", BOB).await;
    let mut c = rtk1(a.addr, "pos-r", None).await;
    let s = subscribed(&mut c, "pos-r").await;
    assert_eq!(s["recoverable"], true, "{s}");

    let mut epoch = None;
    for n in 1..=10u64 {
        let p = b
            .service
            .publish("pos-r", &json!({ "n": n }))
            .await
            .unwrap();
        let p = p.expect("a position from Redis");
        assert_eq!(p.offset, n);
        assert_eq!(epoch.get_or_insert_with(|| p.epoch.clone()), &p.epoch);
        let (o, e, got) = next_pub(&mut c, "pos-r").await;
        assert_eq!((o, got), (n, n));
        assert_eq!(e, p.epoch);
        verbatim(&mut plain, n).await;
        verbatim(&mut plain_b, n).await;
    }
    let epoch = epoch.unwrap();
    c.abort();
    for n in 11..=510u64 {
        b.service
            .publish("pos-r", &json!({ "n": n }))
            .await
            .unwrap();
    }
    // The plain clients receive them all: both instances have them.
    for n in 11..=510u64 {
        verbatim(&mut plain, n).await;
        verbatim(&mut plain_b, n).await;
    }
    let mut c = rtk1(b.addr, "pos-r", Some((&epoch, 10))).await;
    let s = subscribed(&mut c, "pos-r").await;
    assert_eq!(s["recovered"], true, "{s}");
    assert_eq!(s["o"], 10, "{s}");
    for n in 11..=510u64 {
        assert_eq!(next_pub(&mut c, "pos-r").await, (n, epoch.clone(), n));
    }
    let p = b
        .service
        .publish("pos-r", &json!({ "n": 511 }))
        .await
        .unwrap();
    assert_eq!(p.map(|p| p.offset), Some(511));
    assert_eq!(next_pub(&mut c, "pos-r").await, (511, epoch.clone(), 511));
    verbatim(&mut plain, 511).await;
    verbatim(&mut plain_b, 511).await;
    assert_eq!(b.service.metrics().recoveries_succeeded, 1);

    let mut r = redis.client().await;
    let _: i64 = redis::AsyncCommands::publish(&mut r, "pos-r", "raw")
        .await
        .unwrap();
    assert_eq!(
        c.recv_json().await,
        json!({"type":"pub","topic":"pos-r","d":"raw"})
    );
    let f = plain.recv_frame().await.unwrap();
    assert_eq!((f.opcode, &f.payload[..]), (0x1, &b"raw"[..]));

    // A position of another epoch: not recovered.
    let mut other = rtk1(a.addr, "pos-r", Some(("another", 3))).await;
    let s = subscribed(&mut other, "pos-r").await;
    assert_eq!(
        (s["was_recovering"].clone(), s["recovered"].clone()),
        (json!(true), json!(false)),
        "{s}"
    );
    // From before the first publication: all of them (the raw payload has no position and
    // is not kept).
    let mut all = rtk1(b.addr, "pos-r", Some((&epoch, 0))).await;
    let s = subscribed(&mut all, "pos-r").await;
    assert_eq!(s["recovered"], true, "{s}");
    for n in 1..=511u64 {
        assert_eq!(next_pub(&mut all, "pos-r").await, (n, epoch.clone(), n));
    }
    b.service
        .publish("pos-r", &json!({ "n": 512 }))
        .await
        .unwrap();
    assert_eq!(next_pub(&mut all, "pos-r").await, (512, epoch.clone(), 512));
}

/// Redis restarted without persistence forgets the stream: the next publication starts a new
/// epoch. A client positioned on the old one is told `insufficient_state` before anything of
/// the new one, never handed a silent gap; subscribing again with its old position is not a
/// recovery, and it continues in the new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_the_stream_gives_insufficient_state_not_a_gap() {
    let Some(mut redis) = start_redis("a_redis_that_lost_the_stream_gives_insufficient_state")
    else {
        return;
    };
    let a = instance(redis.url()).await;
    let b = instance(redis.url()).await;
    let mut c = rtk1(a.addr, "pos-x", None).await;
    subscribed(&mut c, "pos-x").await;
    let mut epoch = String::new();
    for n in 1..=5u64 {
        b.service
            .publish("pos-x", &json!({ "n": n }))
            .await
            .unwrap();
        let (o, e, got) = next_pub(&mut c, "pos-x").await;
        assert_eq!((o, got), (n, n));
        epoch = e;
    }
    redis.restart();
    // Publish until instance A delivers again; each publish either succeeds or fails, bounded.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (service, stop) = (b.service.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            for n in 6..2_000u64 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if service.publish("pos-x", &json!({ "n": n })).await.is_ok() {
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sent
        })
    };
    let m = c.recv_json().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(m, json!({"type":"insufficient_state","topic":"pos-x"}));
    let sent = tokio::time::timeout(support::WAIT, publisher)
        .await
        .expect("publisher ends")
        .unwrap();
    assert!(sent > 0);
    assert!(a.service.metrics().insufficient_state_broker_gap >= 1);

    let mut again = rtk1(a.addr, "pos-x", Some((&epoch, 5))).await;
    let s = subscribed(&mut again, "pos-x").await;
    assert_eq!(s["was_recovering"], true, "{s}");
    assert_eq!(s["recovered"], false, "{s}");
    assert_ne!(s["e"], epoch.as_str(), "{s}");
    let mut expect = s["o"].as_u64().unwrap() + 1;
    let new_epoch = s["e"].as_str().unwrap().to_owned();
    let p = b
        .service
        .publish("pos-x", &json!({ "n": 9_999 }))
        .await
        .unwrap();
    let p = p.expect("a position");
    assert_eq!(p.epoch, new_epoch);
    // Publications still on their way to instance A may come first, each the next offset.
    loop {
        let (o, e, n) = next_pub(&mut again, "pos-x").await;
        assert_eq!((o, e.as_str()), (expect, new_epoch.as_str()));
        if n == 9_999 {
            assert_eq!(o, p.offset);
            break;
        }
        expect += 1;
    }
}

/// Instance A caches only the last few dozen publications. Clients drop after offset 10; 500
/// are published on instance B; three reconnect to A at once with their position: the range
/// A's cache lacks is read back from the Redis stream, and each gets exactly offsets 11 to 510,
/// in order, then live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_the_cache_lacks_is_read_back_from_redis() {
    let Some(redis) = start_redis("a_range_the_cache_lacks_is_read_back_from_redis") else {
        return;
    };
    let a = instance_caching(redis.url(), 4_096).await;
    let b = instance(redis.url()).await;
    // Keeps instance A subscribed to the topic while the others are away.
    let mut plain = support::connect(a.addr, "pos-h", BOB).await;
    let mut epoch = String::new();
    for n in 1..=10u64 {
        let p = b
            .service
            .publish("pos-h", &json!({ "n": n }))
            .await
            .unwrap();
        epoch = p.expect("a position").epoch;
    }
    for n in 11..=510u64 {
        b.service
            .publish("pos-h", &json!({ "n": n }))
            .await
            .unwrap();
    }
    for n in 1..=510u64 {
        assert_eq!(plain.recv_json().await, json!({ "n": n }));
    }
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (addr, epoch) = (a.addr, epoch.clone());
        clients.push(tokio::spawn(async move {
            let mut c = rtk1(addr, "pos-h", Some((&epoch, 10))).await;
            let s = subscribed(&mut c, "pos-h").await;
            assert_eq!(s["recovered"], true, "{s}");
            assert_eq!(s["o"], 10, "{s}");
            for n in 11..=510u64 {
                assert_eq!(next_pub(&mut c, "pos-h").await, (n, epoch.clone(), n));
            }
            c
        }));
    }
    let mut recovered = Vec::new();
    for c in clients {
        recovered.push(
            tokio::time::timeout(support::WAIT, c)
                .await
                .expect("recovers")
                .unwrap(),
        );
    }
    b.service
        .publish("pos-h", &json!({ "n": 511 }))
        .await
        .unwrap();
    for c in &mut recovered {
        assert_eq!(next_pub(c, "pos-h").await, (511, epoch.clone(), 511));
    }
    assert_eq!(a.service.metrics().recoveries_succeeded, 3);

    // More missed than a recovery re-sends (1 000 here): not recovered, nothing re-sent.
    for n in 512..=1_100u64 {
        b.service
            .publish("pos-h", &json!({ "n": n }))
            .await
            .unwrap();
    }
    for c in &mut recovered {
        for n in 512..=1_100u64 {
            assert_eq!(next_pub(c, "pos-h").await, (n, epoch.clone(), n));
        }
    }
    let mut late = rtk1(a.addr, "pos-h", Some((&epoch, 10))).await;
    let s = subscribed(&mut late, "pos-h").await;
    assert_eq!(s["recovered"], false, "{s}");
    assert_eq!(s["o"], 1_100, "{s}");
    b.service
        .publish("pos-h", &json!({ "n": 1_101 }))
        .await
        .unwrap();
    assert_eq!(
        next_pub(&mut late, "pos-h").await,
        (1_101, epoch.clone(), 1_101)
    );
}

/// Redis drops instance A's subscriber connection (`CLIENT KILL TYPE pubsub`) while instance
/// B publishes a flow: the publications A missed meanwhile are read back from the Redis stream
/// and delivered in order, so every client on A gets every offset exactly once, in order, and
/// none is told `insufficient_state`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscriber_connection_heals_its_gap_from_the_stream() {
    let Some(redis) = start_redis("a_killed_subscriber_connection_heals_its_gap") else {
        return;
    };
    let a = instance(redis.url()).await;
    let b = instance(redis.url()).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut c = rtk1(a.addr, "pos-k", None).await;
        subscribed(&mut c, "pos-k").await;
        clients.push(c);
    }
    const TOTAL: u64 = 2_000;
    let publisher = {
        let service = b.service.clone();
        tokio::spawn(async move {
            for n in 1..=TOTAL {
                service.publish("pos-k", &json!({ "n": n })).await.unwrap();
                if n % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        })
    };
    let mut epoch = String::new();
    let mut first = clients.remove(0);
    for n in 1..=500u64 {
        let (o, e, got) = next_pub(&mut first, "pos-k").await;
        assert_eq!((o, got), (n, n));
        epoch = e;
    }
    let mut r = redis.client().await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(killed >= 1);
    for n in 501..=TOTAL {
        assert_eq!(next_pub(&mut first, "pos-k").await, (n, epoch.clone(), n));
    }
    for c in &mut clients {
        for n in 1..=TOTAL {
            assert_eq!(next_pub(c, "pos-k").await, (n, epoch.clone(), n));
        }
    }
    tokio::time::timeout(support::WAIT, publisher)
        .await
        .expect("publisher ends")
        .unwrap();
    let m = a.service.metrics();
    assert!(m.broker_reconnects >= 1, "{m:?}");
    assert_eq!(m.insufficient_state_broker_gap, 0);
}

/// Redis with an append-only file fsynced on every write is killed and restarted while instance
/// B publishes: the stream and its epoch survive, so every client on instance A receives every
/// publication whose publish succeeded, at its offset, in order, with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_fsynced_aof_a_restart_loses_no_acknowledged_publication() {
    let dir = std::env::temp_dir().join(format!("rtk-aof-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let args = [
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        dir.to_str().unwrap(),
    ];
    let listen = support::redis_server::Listen::Tcp(args.iter().map(|s| s.to_string()).collect());
    let Some(mut redis) =
        support::redis_server::start_redis_with("with_an_fsynced_aof_a_restart", listen)
    else {
        return;
    };
    let a = instance(redis.url()).await;
    let b = instance(redis.url()).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = rtk1(a.addr, "pos-f", None).await;
        subscribed(&mut c, "pos-f").await;
        clients.push(c);
    }
    let publisher = {
        let service = b.service.clone();
        tokio::spawn(async move {
            // Offset → n of every publish that succeeded.
            let mut acked = std::collections::BTreeMap::new();
            let mut n = 0u64;
            while acked.len() < 1_500 && n < 20_000 {
                n += 1;
                if let Ok(Some(p)) = service.publish("pos-f", &json!({ "n": n })).await {
                    acked.insert(p.offset, (n, p.epoch));
                }
                if n % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            acked
        })
    };
    let (o, _, _) = next_pub(&mut clients[0], "pos-f").await;
    assert_eq!(o, 1);
    for _ in 0..300 {
        next_pub(&mut clients[0], "pos-f").await;
    }
    redis.restart();
    let acked = tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .expect("publisher ends")
        .unwrap();
    assert_eq!(acked.len(), 1_500);
    let top = *acked.keys().last().unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        let mut next = if i == 0 { 302 } else { 1 };
        while next <= top {
            let (o, e, n) = next_pub(c, "pos-f").await;
            assert_eq!(o, next, "client {i}");
            if let Some((want, epoch)) = acked.get(&o) {
                assert_eq!((n, &e), (*want, epoch), "client {i} at offset {o}");
            }
            next += 1;
        }
    }
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two instances, both with a subscriber that keeps them on the topic. Instance B publishes at
/// a steady rate while 50 clients, starting on instance A, drop and reconnect at random
/// moments, 20 times each, each time to either instance: every client has every publication
/// exactly once, in order, with one epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_dropping_at_random_across_instances_get_every_publication_once_in_order() {
    const CLIENTS: u64 = 50;
    const ROUNDS: usize = 20;
    const TOTAL: u64 = 3_000;
    let Some(redis) = start_redis("clients_dropping_at_random_across_instances") else {
        return;
    };
    let a = instance_with(redis.url(), |b| b.recovery_max_publications(5_000)).await;
    let b = instance_with(redis.url(), |b| b.recovery_max_publications(5_000)).await;
    let _keep_a = support::connect(a.addr, "pos-load", BOB).await;
    let _keep_b = support::connect(b.addr, "pos-load", BOB).await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = rtk1(a.addr, "pos-load", None).await;
        subscribed(&mut c, "pos-load").await;
        clients.push(c);
    }
    let publisher = {
        let service = b.service.clone();
        tokio::spawn(async move {
            for n in 1..=TOTAL {
                let p = service
                    .publish("pos-load", &json!({ "n": n }))
                    .await
                    .unwrap();
                assert_eq!(p.map(|p| p.offset), Some(n));
                if n % 5 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    let addrs = [a.addr, b.addr];
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(async move {
                let mut conn = Some(c);
                // xorshift, seeded per client: deterministic, no dependency.
                let mut state = 0x2545_f491_4f6c_dd1d_u64 ^ (i as u64 + 1).wrapping_mul(7919);
                let mut next = move |bound: u64| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state % bound
                };
                let mut have = 0u64;
                let mut epoch: Option<String> = None;
                for round in 0..=ROUNDS {
                    let mut c = match conn.take() {
                        Some(c) => c,
                        None => {
                            let addr = addrs[next(2) as usize];
                            let e = epoch.as_deref().unwrap();
                            let mut c = rtk1(addr, "pos-load", Some((e, have))).await;
                            let s = subscribed(&mut c, "pos-load").await;
                            assert_eq!(s["recovered"], true, "client {i} round {round}: {s}");
                            assert_eq!(s["o"], have);
                            c
                        }
                    };
                    let take = if round == ROUNDS {
                        TOTAL
                    } else {
                        1 + next(120)
                    };
                    let until = (have + take).min(TOTAL);
                    while have < until {
                        let (o, e, n) = next_pub(&mut c, "pos-load").await;
                        assert_eq!((o, n), (have + 1, have + 1), "client {i} round {round}");
                        assert_eq!(epoch.get_or_insert_with(|| e.clone()), &e);
                        have = o;
                    }
                    c.abort();
                }
                have
            })
        })
        .collect();
    for t in tasks {
        let have = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a client did not finish")
            .unwrap();
        assert_eq!(have, TOTAL);
    }
    tokio::time::timeout(support::WAIT, publisher)
        .await
        .expect("publisher ends")
        .unwrap();
    let (ma, mb) = (a.service.metrics(), b.service.metrics());
    assert_eq!(
        ma.recoveries_succeeded + mb.recoveries_succeeded,
        CLIENTS * ROUNDS as u64
    );
    assert_eq!(ma.recoveries_failed + mb.recoveries_failed, 0);
    assert_eq!(
        ma.insufficient_state_broker_gap + mb.insufficient_state_broker_gap,
        0
    );
}

/// Publications of a topic without a policy and of one with a policy, interleaved on one
/// Redis connection, each reach every subscriber once and in order (the first are delivered by
/// the subscriber task, the second through the history): verbatim clients get the payloads, an
/// `rtk1` client a position on the positioned topic only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_positioned_publications_interleaved_arrive_once_in_order() {
    const N: u64 = 2_000;
    const TOPICS: [&str; 2] = ["pos-mix", "mix"];
    let Some(redis) = start_redis("plain_and_positioned_publications_interleaved") else {
        return;
    };
    let a = instance(redis.url()).await;
    let b = instance(redis.url()).await;
    let mut clients = Vec::new();
    for topic in TOPICS {
        let plain = support::connect(a.addr, topic, BOB).await;
        let (c, _) = rtk1_subscribed(a.addr, topic, None).await;
        clients.push((topic, plain, c));
    }
    let service = b.service.clone();
    let publisher = tokio::spawn(async move {
        for n in 1..=N {
            for topic in TOPICS {
                let p = service.publish(topic, &json!({ "n": n })).await.unwrap();
                assert_eq!(p.is_some(), topic == "pos-mix");
            }
        }
    });
    for (topic, mut plain, mut c) in clients {
        for n in 1..=N {
            verbatim(&mut plain, n).await;
            let m = c.recv_json().await;
            assert_eq!(
                (
                    m["type"].as_str(),
                    m["topic"].as_str(),
                    m["d"]["n"].as_u64()
                ),
                (Some("pub"), Some(topic), Some(n)),
                "{m}"
            );
            assert_eq!(m.get("o").is_some(), topic == "pos-mix", "{m}");
        }
    }
    tokio::time::timeout(support::WAIT, publisher)
        .await
        .expect("publisher ends")
        .unwrap();
    assert_eq!(a.service.metrics().unpositioned_publishes, N);
}

/// Subscribes to `topic` on `addr` recovering from `since`, which must be refused: returns the
/// `subscribed` message, after checking that only a live publication `marker`, published by
/// `on` after the subscription, follows it.
async fn refused(
    addr: SocketAddr,
    on: &Server,
    topic: &str,
    since: (&str, u64),
    marker: u64,
) -> Value {
    let mut c = rtk1(addr, topic, Some(since)).await;
    let s = subscribed(&mut c, topic).await;
    assert_eq!(s["was_recovering"], true, "{s}");
    assert_eq!(s["recovered"], false, "{s}");
    let p = on
        .service
        .publish(topic, &json!({ "n": marker }))
        .await
        .unwrap()
        .expect("a position");
    let (o, e, n) = next_pub(&mut c, topic).await;
    assert_eq!((o, e.as_str(), n), (p.offset, p.epoch.as_str(), marker));
    s
}

/// With Redis: a position past what a recovery re-sends, of a stream deleted by
/// `remove_history` or by a `DEL` of its keys from another program, or whose publications
/// expired: `recovered: false`, and none of the publications, only the live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_recovery_that_cannot_be_exact_is_refused_whole() {
    let Some(redis) = start_redis("with_redis_recovery_that_cannot_be_exact") else {
        return;
    };
    let a = instance_with(redis.url(), |b| b.recovery_max_publications(300)).await;
    let b = instance(redis.url()).await;
    let mut keep = support::connect(a.addr, "pos-e", BOB).await;
    let publish = |n: u64| publish_n(&b, "pos-e", n);

    // More missed than a recovery re-sends (300 here).
    let mut c = rtk1(a.addr, "pos-e", None).await;
    subscribed(&mut c, "pos-e").await;
    let epoch = publish(1).await.epoch;
    assert_eq!(next_pub(&mut c, "pos-e").await, (1, epoch.clone(), 1));
    c.abort();
    for n in 2..=302 {
        publish(n).await;
    }
    for n in 1..=302 {
        verbatim(&mut keep, n).await;
    }
    let s = refused(a.addr, &b, "pos-e", (&epoch, 1), 303).await;
    assert_eq!(
        (s["e"].as_str(), s["o"].as_u64()),
        (Some(&*epoch), Some(302))
    );
    verbatim(&mut keep, 303).await;

    // `remove_history` on the other instance deletes the stream from Redis: a new epoch, from 1.
    let mut live = rtk1(a.addr, "pos-e", None).await;
    subscribed(&mut live, "pos-e").await;
    assert!(b.service.remove_history("pos-e").await);
    let p = publish(1).await;
    assert_eq!(p.offset, 1);
    assert_ne!(p.epoch, epoch);
    // A client connected meanwhile is told before anything of the new epoch.
    assert_eq!(
        live.recv_json().await,
        json!({"type":"insufficient_state","topic":"pos-e"})
    );
    verbatim(&mut keep, 1).await;
    let s = refused(a.addr, &b, "pos-e", (&epoch, 303), 2).await;
    assert_eq!(
        (s["e"].as_str(), s["o"].as_u64()),
        (Some(&*p.epoch), Some(1))
    );
    verbatim(&mut keep, 2).await;

    // Another program deletes the keys: a new epoch again.
    let mut r = redis.client().await;
    let deleted: i64 = redis::cmd("DEL")
        .arg("{pos-e}:meta")
        .arg("{pos-e}:stream")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    let q = publish(3).await;
    assert_eq!(q.offset, 1);
    assert_ne!(q.epoch, p.epoch);
    verbatim(&mut keep, 3).await;
    let s = refused(a.addr, &b, "pos-e", (&p.epoch, 2), 4).await;
    assert_eq!(
        (s["e"].as_str(), s["o"].as_u64()),
        (Some(&*q.epoch), Some(1))
    );

    // Publications past their TTL (200 ms on `pos-ttl…`): gone from the instance's memory and
    // from Redis, while the epoch lives on.
    let mut keep_ttl = support::connect(a.addr, "pos-ttl-e", BOB).await;
    let mut c = rtk1(a.addr, "pos-ttl-e", None).await;
    subscribed(&mut c, "pos-ttl-e").await;
    let publish_ttl = |n: u64| {
        let service = b.service.clone();
        async move {
            service
                .publish("pos-ttl-e", &json!({ "n": n }))
                .await
                .unwrap()
                .expect("a position")
        }
    };
    let t = publish_ttl(1).await;
    assert_eq!(next_pub(&mut c, "pos-ttl-e").await, (1, t.epoch.clone(), 1));
    c.abort();
    publish_ttl(2).await;
    verbatim(&mut keep_ttl, 1).await;
    verbatim(&mut keep_ttl, 2).await;
    // Past the TTL, whatever the machine's speed.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut c = rtk1(a.addr, "pos-ttl-e", Some((&t.epoch, 1))).await;
    let s = subscribed(&mut c, "pos-ttl-e").await;
    assert_eq!(s["recovered"], false, "{s}");
    assert_eq!(
        (s["e"].as_str(), s["o"].as_u64()),
        (Some(&*t.epoch), Some(2))
    );
    let u = publish_ttl(3).await;
    assert_eq!((u.offset, &u.epoch), (3, &t.epoch));
    assert_eq!(next_pub(&mut c, "pos-ttl-e").await, (3, t.epoch.clone(), 3));

    assert_eq!(a.service.metrics().recoveries_failed, 4);
    assert_eq!(a.service.metrics().recoveries_succeeded, 0);
}

/// A payload another program PUBLISHes on a positioned topic's channel reaches subscribers
/// without a position (`rtk1` clients: a `pub` without `o`/`e`; plain ones: the payload) and
/// is counted as unpositioned. After `SCRIPT FLUSH` the next publish still succeeds (the
/// script is loaded again), at the next offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_publish_and_a_script_flush_leave_positions_contiguous() {
    let Some(redis) = start_redis("a_foreign_publish_and_a_script_flush") else {
        return;
    };
    let a = instance(redis.url()).await;
    let b = instance(redis.url()).await;
    let mut c = rtk1(a.addr, "pos-g", None).await;
    subscribed(&mut c, "pos-g").await;
    let mut plain = support::connect(a.addr, "pos-g", BOB).await;
    let publish = |n: u64| publish_n(&b, "pos-g", n);
    let epoch = publish(1).await.epoch;
    assert_eq!(next_pub(&mut c, "pos-g").await, (1, epoch.clone(), 1));
    verbatim(&mut plain, 1).await;

    let mut r = redis.client().await;
    for raw in ["not json", r#"{"n":50}"#] {
        let _: i64 = redis::AsyncCommands::publish(&mut r, "pos-g", raw)
            .await
            .unwrap();
    }
    assert_eq!(
        c.recv_json().await,
        json!({"type":"pub","topic":"pos-g","d":"not json"})
    );
    assert_eq!(
        c.recv_json().await,
        json!({"type":"pub","topic":"pos-g","d":{"n":50}})
    );
    let f = plain.recv_frame().await.unwrap();
    assert_eq!((f.opcode, &f.payload[..]), (0x1, &b"not json"[..]));
    verbatim(&mut plain, 50).await;
    assert_eq!(a.service.metrics().unpositioned_publishes, 2);

    let flushed: String = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(flushed, "OK");
    for n in 2..=3 {
        let p = publish(n).await;
        assert_eq!((p.offset, &p.epoch), (n, &epoch));
        assert_eq!(next_pub(&mut c, "pos-g").await, (n, epoch.clone(), n));
        verbatim(&mut plain, n).await;
    }
    assert_eq!(b.service.metrics().publish_errors, 0);
}

/// Twenty clients recover the same range, which instance A's small cache lacks, at the same
/// time (Redis paused until A has read every `subscribe` command): one read from the Redis
/// stream serves them all, and each gets exactly the publications it missed, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_recoveries_of_one_range_share_one_read() {
    const CLIENTS: u64 = 20;
    let Some(redis) = start_redis("many_recoveries_of_one_range_share_one_read") else {
        return;
    };
    let a = instance_with(redis.url(), |b| {
        b.history_max_bytes(4_096)
            .authorize_topics(|_, _, _: String| async { Ok(()) })
    })
    .await;
    let b = instance(redis.url()).await;
    let mut keep = support::connect(a.addr, "pos-s", BOB).await;
    let mut epoch = String::new();
    for n in 1..=200u64 {
        let p = b
            .service
            .publish("pos-s", &json!({ "n": n }))
            .await
            .unwrap();
        epoch = p.expect("a position").epoch;
    }
    for n in 1..=200u64 {
        verbatim(&mut keep, n).await;
    }
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = rtk1(a.addr, "lobby", None).await;
        subscribed(&mut c, "lobby").await;
        clients.push(c);
    }
    let m = a.service.metrics();
    assert_eq!((m.broker_history_reads, m.messages_in), (0, 0));
    // Paused, Redis answers no read: every join waits on the first one. Far shorter than the
    // publisher's timeout (the read's) and the subscriber's probe timeout.
    redis.signal("STOP");
    let since = json!({"type":"subscribe","topic":"pos-s","since":{"o":10,"e":epoch}});
    for c in &mut clients {
        c.send_text(&since.to_string()).await;
    }
    let svc = a.service.clone();
    support::wait_until("every subscribe read", move || {
        svc.metrics().messages_in == CLIENTS
    })
    .await;
    // From reading a command to asking the dispatcher takes no I/O.
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.signal("CONT");
    for c in &mut clients {
        let s = subscribed(c, "pos-s").await;
        assert_eq!(s["recovered"], true, "{s}");
        for n in 11..=200u64 {
            assert_eq!(next_pub(c, "pos-s").await, (n, epoch.clone(), n));
        }
    }
    let m = a.service.metrics();
    assert_eq!(m.recoveries_succeeded, CLIENTS);
    assert_eq!(m.broker_history_reads, 1);
}

/// Instance A receives a topic's publications from 101 on; clients recover on it from 50, 50
/// again, 20 and 30. What A lacks is read from the Redis stream once per range and kept in
/// front of A's cache: the second recovery from 50 and the one from 30 read nothing, and every
/// client gets every publication after its position, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_read_back_serves_the_next_recoveries_from_memory() {
    let Some(redis) = start_redis("a_range_read_back_serves_the_next_recoveries") else {
        return;
    };
    let a = instance(redis.url()).await;
    let b = instance(redis.url()).await;
    let publish = |n: u64| publish_n(&b, "pos-m", n);
    let epoch = publish(1).await.epoch;
    for n in 2..=100 {
        publish(n).await;
    }
    // From here on A is subscribed and caches what it receives.
    let mut keep = support::connect(a.addr, "pos-m", BOB).await;
    for n in 101..=200 {
        publish(n).await;
    }
    for n in 101..=200 {
        verbatim(&mut keep, n).await;
    }
    for (since, reads) in [(50, 1), (50, 1), (20, 2), (30, 2)] {
        let mut c = rtk1(a.addr, "pos-m", Some((&epoch, since))).await;
        let s = subscribed(&mut c, "pos-m").await;
        assert_eq!(s["recovered"], true, "from {since}: {s}");
        assert_eq!(s["o"], since, "{s}");
        for n in since + 1..=200 {
            assert_eq!(next_pub(&mut c, "pos-m").await, (n, epoch.clone(), n));
        }
        let m = a.service.metrics();
        assert_eq!(
            m.broker_history_reads, reads,
            "after the recovery from {since}"
        );
    }
    assert_eq!(a.service.metrics().recoveries_succeeded, 4);
}

/// The next frame, which must be the text frame of `basic_chat`'s `NewMessage` in `general`,
/// byte for byte.
async fn chat_frame(c: &mut Client, user: &str, text: &str) {
    let f = c.recv_frame().await.expect("a frame");
    assert_eq!(f.opcode, 0x1);
    assert_eq!(
        String::from_utf8(f.payload).unwrap(),
        format!(r#"{{"NewMessage":{{"room":"general","username":"{user}","text":"{text}"}}}}"#)
    );
}

/// The next frame of an `rtk1` client of `basic_chat`'s `general` that is not a presence event
/// (`general` tracks presence, so `join` and `leave` frames come between its messages).
async fn chat_json(c: &mut Client) -> Value {
    loop {
        let m = c.recv_json().await;
        if m["type"] != "join" && m["type"] != "leave" {
            return m;
        }
    }
}

/// The `basic_chat` example as two processes on one Redis: an `rtk1` client of `general` on
/// instance A drops, messages are sent through instance B, and it reconnects to B with its
/// position: it gets exactly the missed messages, in order, then live ones; a plain client
/// sees today's frames, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_chat_on_two_instances_recovers_on_the_other_one() {
    let Some(redis) = start_redis("basic_chat_on_two_instances_recovers") else {
        return;
    };
    let url = redis.url();
    let a = support::basic_chat(2, Some(&url));
    let b = support::basic_chat(2, Some(&url));
    let mut plain = support::connect(b.addr, "general", BOB).await;
    let mut c = rtk1(a.addr, "general", None).await;
    subscribed(&mut c, "general").await;
    c.send_text(&support::send_message("general", "first"))
        .await;
    let m = chat_json(&mut c).await;
    assert_eq!(m["type"], "pub", "{m}");
    assert_eq!(m["d"]["NewMessage"]["text"], "first");
    let (top, epoch) = (
        m["o"].as_u64().unwrap(),
        m["e"].as_str().unwrap().to_owned(),
    );
    chat_frame(&mut plain, "alice", "first").await;
    c.abort();

    let missed = ["second", "third", "fourth"];
    for text in missed {
        plain
            .send_text(&support::send_message("general", text))
            .await;
        chat_frame(&mut plain, "bob", text).await;
    }
    let mut c = rtk1(b.addr, "general", Some((&epoch, top))).await;
    let s = subscribed(&mut c, "general").await;
    assert_eq!(s["recovered"], true, "{s}");
    assert_eq!(s["o"], top, "{s}");
    for (i, text) in missed.into_iter().enumerate() {
        let m = chat_json(&mut c).await;
        assert_eq!(m["type"], "pub", "{m}");
        assert_eq!(
            (m["o"].as_u64(), m["e"].as_str()),
            (Some(top + 1 + i as u64), Some(&*epoch))
        );
        assert_eq!(m["d"]["NewMessage"]["username"], "bob");
        assert_eq!(m["d"]["NewMessage"]["text"], text);
    }
    plain
        .send_text(&support::send_message("general", "live"))
        .await;
    let m = chat_json(&mut c).await;
    assert_eq!(
        (m["o"].as_u64(), m["e"].as_str()),
        (Some(top + 4), Some(&*epoch))
    );
    assert_eq!(m["d"]["NewMessage"]["text"], "live");
    chat_frame(&mut plain, "bob", "live").await;
    drop((a, b));
}

/// Instance B has no subscriber of the topic, so it has received none of its publications. A
/// client that drops from instance A and reconnects to B with its position gets exactly what it
/// missed (read from the Redis stream), in order, then live ones; on other such topics, a client
/// already up to date gets nothing twice, and a position of another epoch is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_an_instance_that_received_nothing_of_the_topic() {
    let Some(redis) = start_redis("a_client_recovers_on_an_instance_that_received_nothing") else {
        return;
    };
    let a = instance(redis.url()).await;
    let b = instance(redis.url()).await;
    let mut c = rtk1(a.addr, "pos-c1", None).await;
    subscribed(&mut c, "pos-c1").await;
    let epoch = publish_n(&a, "pos-c1", 1).await.epoch;
    for n in 2..=10 {
        publish_n(&a, "pos-c1", n).await;
    }
    for n in 1..=10 {
        assert_eq!(next_pub(&mut c, "pos-c1").await, (n, epoch.clone(), n));
    }
    c.abort();
    for n in 11..=510 {
        publish_n(&a, "pos-c1", n).await;
    }
    // More are published while it reconnects: some between B's read and B's subscription.
    let publisher = {
        let service = a.service.clone();
        tokio::spawn(async move {
            for n in 511..=700u64 {
                service.publish("pos-c1", &json!({ "n": n })).await.unwrap();
                if n % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    let mut c = rtk1(b.addr, "pos-c1", Some((&epoch, 10))).await;
    let s = subscribed(&mut c, "pos-c1").await;
    assert_eq!(s["recovered"], true, "{s}");
    assert_eq!(s["o"], 10, "{s}");
    tokio::time::timeout(support::WAIT, publisher)
        .await
        .expect("publisher ends")
        .unwrap();
    // Live ones follow, whichever instance publishes them (the first one after a run B
    // missed brings that run in, in order).
    publish_n(&a, "pos-c1", 701).await;
    publish_n(&b, "pos-c1", 702).await;
    for n in 11..=702 {
        assert_eq!(next_pub(&mut c, "pos-c1").await, (n, epoch.clone(), n));
    }

    // Up to date: nothing re-sent, the next live one comes next.
    let e2 = publish_n(&a, "pos-c2", 1).await.epoch;
    for n in 2..=5 {
        publish_n(&a, "pos-c2", n).await;
    }
    let mut d = rtk1(b.addr, "pos-c2", Some((&e2, 5))).await;
    let s = subscribed(&mut d, "pos-c2").await;
    assert_eq!(
        (s["recovered"].clone(), s["o"].clone()),
        (json!(true), json!(5)),
        "{s}"
    );
    publish_n(&a, "pos-c2", 6).await;
    assert_eq!(next_pub(&mut d, "pos-c2").await, (6, e2, 6));

    // Another epoch: refused, and the client continues in the stream's.
    let e3 = publish_n(&a, "pos-c3", 1).await.epoch;
    let mut f = rtk1(b.addr, "pos-c3", Some(("another", 1))).await;
    let s = subscribed(&mut f, "pos-c3").await;
    assert_eq!(s["recovered"], false, "{s}");
    assert_eq!(
        (s["e"].as_str(), s["o"].as_u64()),
        (Some(&*e3), Some(1)),
        "{s}"
    );
    publish_n(&a, "pos-c3", 2).await;
    assert_eq!(next_pub(&mut f, "pos-c3").await, (2, e3, 2));

    let m = b.service.metrics();
    assert_eq!((m.recoveries_succeeded, m.recoveries_failed), (2, 1));
}

/// Redis behind Sentinel, a positioned topic, publications flowing through instance B, and the
/// primary killed (SIGKILL). The clients, one on each instance, follow the protocol: on
/// `insufficient_state` they subscribe again from their position. None loses its connection;
/// each ends with the publications in order, none twice, and with every publication whose
/// publish succeeded, unless a recovery was refused: a promoted replica that lacked the last
/// publications ends the stream's epoch, so a position past what it lost is never taken for a
/// complete one. Never a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_flow_loses_no_acknowledged_publication() {
    const TEST: &str = "a_sentinel_failover_under_flow";
    let Some(mut primary) = start_redis(TEST) else {
        return;
    };
    let replica_of = vec![
        "--replicaof".into(),
        "127.0.0.1".into(),
        primary.port.to_string(),
    ];
    let Some(_replica) = start_redis_with(TEST, Listen::Tcp(replica_of)) else {
        return;
    };
    let Some(sentinel) = start_sentinel(TEST, primary.port, "chat") else {
        return;
    };
    let url = format!("redis+sentinel://127.0.0.1:{}/chat", sentinel.port);
    // Subscribe commands allowed on every topic.
    let open = |b: WebsocketServiceBuilder<ChatHandler>| {
        b.authorize_topics(|_, _, _: String| async { Ok::<(), axum::http::StatusCode>(()) })
    };
    let (a, b) = (
        instance_with(url.clone(), open).await,
        instance_with(url, open).await,
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut received = Vec::new();
    let mut readers = Vec::new();
    for addr in [a.addr, b.addr] {
        let mut c = rtk1(addr, "pos-fo", None).await;
        subscribed(&mut c, "pos-fo").await;
        let (stop, seen) = (stop.clone(), Arc::new(Mutex::new(Received::default())));
        received.push(seen.clone());
        readers.push(follow(c, "pos-fo", seen, stop));
    }

    // About 500 publications a second through B, each awaited; `acked` holds those that got a
    // position (the others failed while there was no primary).
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let publishing = {
        let (service, acked) = (b.service.clone(), acked.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            for n in 1u64.. {
                tick.tick().await;
                if let Ok(Some(_)) = service.publish("pos-fo", &json!({ "n": n })).await {
                    acked.lock().unwrap().push(n);
                }
            }
        })
    };
    let count = |acked: &Mutex<Vec<u64>>| acked.lock().unwrap().len();
    support::wait_until("publications flow", || count(&acked) >= 200).await;
    primary.kill();
    let before = count(&acked);
    let resumed = tokio::time::timeout(Duration::from_secs(30), async {
        while count(&acked) < before + 300 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    publishing.abort();
    assert!(
        resumed.is_ok(),
        "publishing never resumed after the failover"
    );
    let acked = acked.lock().unwrap().clone();
    let last = *acked.last().unwrap();
    for (i, seen) in received.iter().enumerate() {
        let seen = seen.clone();
        support::wait_until(
            &format!("client {i} to have publication {last}"),
            move || seen.lock().unwrap().ns.contains(&last),
        )
        .await;
    }
    stop.store(true, Ordering::Release);
    for reader in readers {
        reader.await.expect("a client's connection failed");
    }

    for (i, seen) in received.iter().enumerate() {
        let seen = seen.lock().unwrap();
        for w in seen.ns.windows(2) {
            assert!(w[1] > w[0], "client {i}: {} after {}", w[1], w[0]);
        }
        let missing: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|n| !seen.ns.contains(n))
            .collect();
        assert!(
            missing.is_empty() || seen.refused,
            "client {i} silently lacks acknowledged publications {missing:?}"
        );
    }
}
