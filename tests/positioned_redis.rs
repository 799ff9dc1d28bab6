//! Positioned topics over Redis, each test with its own redis-server: Redis assigns the
//! positions, every instance delivers them, and recovery works on any instance that received
//! the publications. Publications are counted by offset and by the sequence number inside
//! the payload.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use axum_realtime_kit::TopicPolicy;
use serde_json::{Value, json};
use support::redis_server::start_redis;
use support::{ALICE, BOB, Client, Server, serve_chat, try_connect};

/// An instance on `url` whose topics starting with `pos` keep 5 000 publications.
async fn instance(url: String) -> Server {
    instance_caching(url, 64 << 20).await
}

/// [`instance`], caching at most `bytes` of history in memory.
async fn instance_caching(url: String, bytes: usize) -> Server {
    let policy = TopicPolicy::history(5_000, Duration::from_secs(60));
    let service = support::chat::builder()
        .shards(2)
        .history_max_bytes(bytes)
        .recovery_max_publications(1_000)
        .topic_policy(move |topic| topic.starts_with("pos").then(|| policy.clone()))
        .redis_url(Some(url))
        .build();
    let server = serve_chat(service).await;
    let ready = server.service.clone();
    support::wait_until("instance ready", move || ready.is_ready()).await;
    server
}

/// Opens `topic` speaking `rtk1`, recovering from `since` (epoch, offset) if given.
async fn rtk1(addr: SocketAddr, topic: &str, since: Option<(&str, u64)>) -> Client {
    let mut path = format!("/ws/{topic}?token={ALICE}&proto=rtk1");
    if let Some((epoch, offset)) = since {
        path.push_str(&format!("&since={offset}&epoch={epoch}"));
    }
    let (status, client) = try_connect(addr, &path, &[]).await;
    assert_eq!(status, 101, "upgrade to {path} refused");
    client.unwrap()
}

async fn subscribed(c: &mut Client, topic: &str) -> Value {
    let m = c.recv_json().await;
    assert_eq!(m["type"], "subscribed", "{m}");
    assert_eq!(m["topic"], topic, "{m}");
    m
}

/// The next message, which must be a `pub` of `topic`: its offset, epoch and payload's `n`.
async fn next_pub(c: &mut Client, topic: &str) -> (u64, String, u64) {
    let m = c.recv_json().await;
    assert_eq!(m["type"], "pub", "{m}");
    assert_eq!(m["topic"], topic, "{m}");
    (
        m["o"].as_u64().expect("an offset"),
        m["e"].as_str().expect("an epoch").to_owned(),
        m["d"]["n"].as_u64().expect("payload with n"),
    )
}

/// Publications on instance B get positions from Redis, in order, with one epoch; a client on
/// instance A receives them with those positions, drops, misses 500 published on B and
/// reconnects to A with its position: it gets exactly those 500, in order, then live ones.
/// A plain client gets the payloads verbatim, and a payload another program PUBLISHes on the
/// channel reaches both without a position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_come_from_redis_and_a_client_recovers_on_another_instance() {
    let Some(redis) = start_redis("positions_come_from_redis_and_a_client_recovers") else {
        return;
    };
    let a = instance(redis.url()).await;
    let b = instance(redis.url()).await;
    let mut plain = support::connect(a.addr, "pos-r", BOB).await;
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
        assert_eq!(plain.recv_json().await, json!({ "n": n }));
    }
    let epoch = epoch.unwrap();
    c.abort();
    for n in 11..=510u64 {
        b.service
            .publish("pos-r", &json!({ "n": n }))
            .await
            .unwrap();
    }
    // The plain client receives them all: instance A has them too.
    for n in 11..=510u64 {
        assert_eq!(plain.recv_json().await, json!({ "n": n }));
    }
    let mut c = rtk1(a.addr, "pos-r", Some((&epoch, 10))).await;
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
    assert_eq!(plain.recv_json().await, json!({ "n": 511 }));

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

    // A position of another epoch, or more missed than a recovery re-sends: not recovered.
    let mut other = rtk1(a.addr, "pos-r", Some(("another", 3))).await;
    let s = subscribed(&mut other, "pos-r").await;
    assert_eq!(
        (s["was_recovering"].clone(), s["recovered"].clone()),
        (json!(true), json!(false)),
        "{s}"
    );
    let mut far = rtk1(b.addr, "pos-r", Some((&epoch, 0))).await;
    let s = subscribed(&mut far, "pos-r").await;
    assert_eq!(s["recovered"], false, "{s}");
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
    assert_eq!(a.service.metrics().insufficient_state_broker_gap, 0);
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
