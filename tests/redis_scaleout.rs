//! Instances sharing topics through Redis, and what happens when Redis misbehaves. Each test starts
//! its own `redis-server` on a free port (see `support::redis_server`).

mod support;

use std::sync::Arc;

use async_trait::async_trait;
use axum_realtime_kit::bench_api::open_router;
use axum_realtime_kit::prelude::*;
use redis::AsyncCommands;
use serde_json::{Value, json};
use support::redis_server::{RedisServer, start_redis};
use support::*;

macro_rules! redis_or_skip {
    ($name:expr) => {
        match start_redis($name) {
            Some(r) => r,
            None => return,
        }
    };
}

async fn numsub(redis: &RedisServer, channel: &str) -> i64 {
    let mut c = redis.client().await;
    let reply: Vec<redis::Value> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut c)
        .await
        .unwrap();
    match &reply[1] {
        redis::Value::Int(n) => *n,
        other => panic!("unexpected NUMSUB reply {other:?}"),
    }
}

async fn wait_numsub(redis: &RedisServer, channel: &str, want: i64) {
    let ok = tokio::time::timeout(WAIT, async {
        while numsub(redis, channel).await != want {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "NUMSUB {channel} never reached {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_on_one_instance_reaches_clients_on_another() {
    let redis = redis_or_skip!("a_message_on_one_instance_reaches_clients_on_another");
    let a = chat_server_with(Some(redis.url()), 2).await;
    let b = chat_server_with(Some(redis.url()), 1).await;
    let mut alice = connect(a.addr, "general", ALICE).await;
    let mut bob = connect(b.addr, "general", BOB).await;
    let mut bystander = connect(b.addr, "random", BOB).await;

    alice.send_text(&send_message("general", "across")).await;
    let expected =
        json!({"NewMessage": {"room": "general", "username": "alice", "text": "across"}});
    assert_eq!(alice.recv_json().await, expected);
    assert_eq!(bob.recv_json().await, expected);
    bystander.assert_nothing_pending().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_publish_is_delivered_verbatim() {
    let redis = redis_or_skip!("an_external_publish_is_delivered_verbatim");
    let a = chat_server_with(Some(redis.url()), 2).await;
    let b = chat_server_with(Some(redis.url()), 2).await;
    let mut on_a = connect(a.addr, "general", ALICE).await;
    let mut on_b = connect(b.addr, "general", BOB).await;
    let mut c = redis.client().await;
    for payload in [
        r#"{"custom": [1, 2, 3]}"#,
        "plain text, not JSON",
        "ünïcödé",
    ] {
        let _: i64 = c.publish("general", payload).await.unwrap();
        for client in [&mut on_a, &mut on_b] {
            let f = client.recv_frame().await.unwrap();
            assert_eq!(f.opcode, 0x1);
            assert_eq!(f.payload, payload.as_bytes());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_arrive_in_order_on_two_instances() {
    const N: usize = 10_000;
    let redis = redis_or_skip!("ten_thousand_messages_arrive_in_order_on_two_instances");
    let a = chat_server_with(Some(redis.url()), 2).await;
    let b = chat_server_with(Some(redis.url()), 4).await;
    let mut readers = Vec::new();
    for addr in [a.addr, b.addr, b.addr] {
        let mut c = connect(addr, "general", BOB).await;
        c.assert_nothing_pending().await;
        readers.push(tokio::spawn(async move {
            for i in 0..N {
                let m = c.recv_json().await;
                assert_eq!(m["NewMessage"]["text"], i.to_string(), "message {i}");
            }
        }));
    }
    let mut sender = connect(a.addr, "general", ALICE).await;
    let mut burst = Vec::new();
    for i in 0..N {
        burst.extend(encode_client_frame(
            true,
            0x1,
            send_message("general", &i.to_string()).as_bytes(),
            true,
        ));
    }
    sender.send_raw(&burst).await;
    for i in 0..N {
        assert_eq!(
            sender.recv_json().await["NewMessage"]["text"],
            i.to_string()
        );
    }
    for r in readers {
        r.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_unsubscribes_after_its_last_subscriber_leaves() {
    let redis = redis_or_skip!("the_instance_unsubscribes_after_its_last_subscriber_leaves");
    let a = chat_server_with(Some(redis.url()), 4).await;
    assert_eq!(numsub(&redis, "random").await, 0);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(a.addr, "random", BOB).await);
    }
    // One subscription per instance, however many local subscribers (on however many shards).
    assert_eq!(numsub(&redis, "random").await, 1);
    let last = clients.pop().unwrap();
    for c in clients {
        c.abort();
    }
    wait_until("two clients gone", || {
        a.service.metrics().connections_active == 1
    })
    .await;
    assert_eq!(numsub(&redis, "random").await, 1);
    last.abort();
    wait_numsub(&redis, "random", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_resumes_after_a_redis_restart_on_the_same_connections() {
    let mut redis =
        redis_or_skip!("delivery_resumes_after_a_redis_restart_on_the_same_connections");
    let a = chat_server_with(Some(redis.url()), 2).await;
    let b = chat_server_with(Some(redis.url()), 2).await;
    let mut alice = connect(a.addr, "general", ALICE).await;
    let mut bob = connect(b.addr, "general", BOB).await;

    redis.restart();
    let started = std::time::Instant::now();
    wait_until("both instances ready again", || {
        a.service.is_ready() && b.service.is_ready()
    })
    .await;
    alice.send_text(&send_message("general", "back")).await;
    let m = alice.recv_json().await;
    assert_eq!(m["NewMessage"]["text"], "back", "{m}");
    assert_eq!(bob.recv_json().await["NewMessage"]["text"], "back");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "delivery took {:?} to come back",
        started.elapsed()
    );
    assert_eq!(a.service.metrics().connections_opened, 1);
    assert_eq!(b.service.metrics().connections_opened, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_a_burst_gives_errors_not_panics_or_hangs() {
    const N: usize = 3_000;
    let mut redis = redis_or_skip!("redis_killed_during_a_burst_gives_errors_not_panics_or_hangs");
    let a = chat_server_with(Some(redis.url()), 2).await;
    let mut alice = connect(a.addr, "general", ALICE).await;
    let mut burst = Vec::new();
    for i in 0..N {
        burst.extend(encode_client_frame(
            true,
            0x1,
            send_message("general", &i.to_string()).as_bytes(),
            true,
        ));
    }
    alice.send_raw(&burst[..burst.len() / 3]).await;
    // Wait until part of the burst went through, then kill Redis under the rest of it.
    let first = alice.recv_json().await;
    assert_eq!(first["NewMessage"]["text"], "0");
    redis.kill();
    alice.send_raw(&burst[burst.len() / 3..]).await;
    alice.send_text("\"Ping\"").await;
    let mut errors = 0;
    loop {
        let m = alice.recv_json().await;
        if m == "Pong" {
            break;
        }
        if m["type"] == "error" {
            assert!(m["message"].as_str().unwrap().contains("broadcast"), "{m}");
            errors += 1;
        }
    }
    assert!(errors > 0, "publishes during the outage must fail visibly");
    assert!(!a.service.is_ready());
    assert!(a.service.metrics().publish_errors > 0);
}

// A handler whose clients can join and leave extra topics: `{"join": ["t1", …]}`,
// `{"leave": [...]}`. Like an application's validator, it lets a user join only its own
// `user:<id>` topic among the `user:` ones.
#[derive(Debug)]
struct Joiner;

#[async_trait]
impl MessageHandler for Joiner {
    type ClientMessage = Value;
    type ServerEvent = Value;
    type AppState = ();
    type UserId = u32;

    async fn handle_direct_message(
        &self,
        msg: &Value,
        ctx: &ConnectionContext<(), u32>,
    ) -> Result<Option<Value>, HandlerError> {
        let names = |key: &str| -> Vec<String> {
            msg[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let leave = names("leave");
        for topic in &leave {
            ctx.sink.leave(topic).await;
        }
        let own = format!("user:{}", ctx.user_id);
        let (allowed, forbidden): (Vec<_>, Vec<_>) = names("join")
            .into_iter()
            .partition(|t| !t.starts_with("user:") || *t == own);
        // Concurrently: every join then waits on the same batched SUBSCRIBE.
        let joins = allowed.iter().map(|t| ctx.sink.join(t));
        let results = futures_util::future::join_all(joins).await;
        let joined = results.iter().filter(|r| r.is_ok()).count();
        let refused = forbidden.len() + results.len() - joined;
        Ok(Some(
            json!({ "joined": joined, "refused": refused, "left": leave.len() }),
        ))
    }

    async fn handle_broadcast_message(
        &self,
        _msg: Value,
        _ctx: &ConnectionContext<(), u32>,
    ) -> Result<Option<Value>, HandlerError> {
        Ok(None)
    }
}

async fn joiner_server(redis_url: String) -> (std::net::SocketAddr, Arc<WebsocketService<Joiner>>) {
    // One connection joins up to 10 000 topics here, past the default limit of 128.
    let service = WebsocketService::builder(Joiner, Arc::new(()))
        .redis_url(Some(redis_url))
        .max_topics_per_connection(10_000)
        .build();
    let addr = support::serve(open_router(service.clone(), 1)).await;
    wait_ready(&service).await;
    (addr, service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_topics_are_all_resubscribed_after_a_restart() {
    const TOPICS: usize = 10_000;
    let mut redis = redis_or_skip!("ten_thousand_topics_are_all_resubscribed_after_a_restart");
    let (addr, service) = joiner_server(redis.url()).await;
    let (_, client) = try_connect(addr, "/ws/t0", &[]).await;
    let mut client = client.unwrap();
    // In messages of 1 000 topics, under the 64 KiB message limit.
    let topics: Vec<String> = (1..TOPICS).map(|i| format!("t{i}")).collect();
    for chunk in topics.chunks(1000) {
        client
            .send_text(&json!({ "join": chunk }).to_string())
            .await;
        assert_eq!(client.recv_json().await["joined"], chunk.len());
    }

    let channels = |redis: &RedisServer| {
        let url = redis.url();
        async move {
            let mut c = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let list: Vec<String> = redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg("t*")
                .query_async(&mut c)
                .await
                .unwrap();
            list.len()
        }
    };
    assert_eq!(channels(&redis).await, TOPICS);

    redis.restart();
    wait_until("ready after restart", || service.is_ready()).await;
    let ok = tokio::time::timeout(WAIT, async {
        while channels(&redis).await != TOPICS {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "not every topic was re-subscribed");
    // And they deliver: a publish on the last topic reaches the client.
    let mut c = redis.client().await;
    let _: i64 = c.publish(format!("t{}", TOPICS - 1), "hi").await.unwrap();
    let f = client.recv_frame().await.unwrap();
    assert_eq!(f.payload, b"hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_connection_that_goes_silent_is_rebuilt() {
    let redis = redis_or_skip!("a_subscriber_connection_that_goes_silent_is_rebuilt");
    let proxy = support::proxy::Proxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let url = format!("redis://{}/", proxy.addr);
    let a = chat_server_with(Some(url), 2).await;
    let mut alice = connect(a.addr, "general", ALICE).await;

    // The connections stay open but nothing flows: only the liveness probe can notice.
    proxy.freeze_existing();
    wait_until("probe detects the silent connection", || {
        a.service.metrics().broker_reconnects >= 1
    })
    .await;
    wait_until("ready on a new connection", || a.service.is_ready()).await;

    // Delivery works again on the same client connection.
    let mut c = redis.client().await;
    let _: i64 = c.publish("general", "after the freeze").await.unwrap();
    let f = alice.recv_frame().await.unwrap();
    assert_eq!(f.payload, b"after the freeze");
    assert_eq!(a.service.metrics().connections_opened, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_topics_receive_from_another_instance_until_left() {
    let redis = redis_or_skip!("joined_topics_receive_from_another_instance_until_left");
    let (a_addr, _a) = joiner_server(redis.url()).await;
    let (_, b) = joiner_server(redis.url()).await;
    let (_, client) = try_connect(a_addr, "/ws/lobby", &[]).await;
    let mut client = client.unwrap();

    // The user's own notification topic and a public one; someone else's and a malformed name
    // are refused, and the connection stays open.
    let join = json!({ "join": ["user:1", "news", "user:2", "bad topic*"] });
    client.send_text(&join.to_string()).await;
    let reply = client.recv_json().await;
    assert_eq!(
        (reply["joined"].as_u64(), reply["refused"].as_u64()),
        (Some(2), Some(2))
    );
    wait_numsub(&redis, "user:1", 1).await;
    wait_numsub(&redis, "news", 1).await;
    assert_eq!(numsub(&redis, "user:2").await, 0);

    // Published on the other instance: both joined topics and the opening one deliver.
    b.publish("user:2", &json!({ "n": "not yours" }))
        .await
        .unwrap();
    b.publish("user:1", &json!({ "n": 1 })).await.unwrap();
    b.publish("news", &json!({ "n": 2 })).await.unwrap();
    b.publish("lobby", &json!({ "n": 3 })).await.unwrap();
    for n in 1..=3 {
        assert_eq!(client.recv_json().await["n"], n);
    }

    // After leaving `news` the instance drops its Redis subscription; the rest still deliver.
    client
        .send_text(&json!({ "leave": ["news"] }).to_string())
        .await;
    assert_eq!(client.recv_json().await["left"], 1);
    wait_numsub(&redis, "news", 0).await;
    b.publish("news", &json!({ "n": "left" })).await.unwrap();
    b.publish("user:1", &json!({ "n": 4 })).await.unwrap();
    assert_eq!(client.recv_json().await["n"], 4);
    // Nothing else is queued: the next frame is the reply to this empty request.
    client.send_text(&json!({ "join": [] }).to_string()).await;
    assert_eq!(client.recv_json().await["joined"], 0);
}
