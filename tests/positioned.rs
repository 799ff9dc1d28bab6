//! Positioned topics and the `rtk1` protocol over real sockets, in-process broker: every test
//! counts the publications each client receives by offset and by the sequence number inside
//! the payload, and asserts the exact sequence.

mod support;

use std::time::Duration;

use axum::http::StatusCode;
use axum_realtime_kit::{SlowConsumerPolicy, TopicPolicy, WebsocketServiceBuilder};
use serde_json::{Value, json};
use support::chat::ChatHandler;
use support::rtk1::{rtk1, subscribed};
use support::{ALICE, BOB, Client, Server, WAIT, serve_chat, try_connect};

/// Topics starting with `pos` keep 5 000 publications for a minute; others have no history.
fn builder() -> WebsocketServiceBuilder<ChatHandler> {
    positioned(TopicPolicy::history(5_000, Duration::from_secs(60)))
}

fn positioned(policy: TopicPolicy) -> WebsocketServiceBuilder<ChatHandler> {
    support::chat::builder()
        .shards(2)
        .topic_policy(move |topic| topic.starts_with("pos").then(|| policy.clone()))
        .authorize_topics(|_, _, topic: String| async move {
            if topic.starts_with("secret") {
                Err(StatusCode::FORBIDDEN)
            } else {
                Ok(())
            }
        })
}

async fn start(builder: WebsocketServiceBuilder<ChatHandler>) -> Server {
    serve_chat(builder.build()).await
}

/// The next message, which must be a `pub` of `topic`: its offset and its payload's `n`.
async fn next_pub(c: &mut Client, topic: &str) -> (u64, u64) {
    let m = c.recv_json().await;
    assert_eq!(m["type"], "pub", "{m}");
    assert_eq!(m["topic"], topic, "{m}");
    let o = m["o"].as_u64().unwrap_or(0);
    (o, m["d"]["n"].as_u64().expect("payload with n"))
}

async fn publish(server: &Server, topic: &str, n: u64) -> Option<u64> {
    let position = server
        .service
        .publish(topic, &json!({ "n": n }))
        .await
        .unwrap();
    position.map(|p| p.offset)
}

/// A client drops, 500 messages are published while it is away and more while it reconnects:
/// it gets exactly the missed ones in order, then the live ones, none twice; a client that did
/// not ask for `rtk1` receives the same publications verbatim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_client_gets_exactly_what_it_missed_then_live() {
    let server = start(builder().recovery_max_publications(1_000)).await;
    let mut plain = support::connect(server.addr, "pos-a", BOB).await;
    let mut a = rtk1(server.addr, "pos-a", None).await;
    let first = subscribed(&mut a, "pos-a").await;
    assert_eq!(first["recoverable"], true);
    assert_eq!(first["o"], 0);
    assert_eq!(first["was_recovering"], false);
    assert_eq!(first["recovered"], false);
    let epoch = first["e"].as_str().unwrap().to_owned();
    assert!(!epoch.is_empty());

    for n in 1..=10 {
        assert_eq!(publish(&server, "pos-a", n).await, Some(n));
        assert_eq!(next_pub(&mut a, "pos-a").await, (n, n));
    }
    a.abort();
    for n in 11..=510 {
        assert_eq!(publish(&server, "pos-a", n).await, Some(n));
    }
    // More are published while the client reconnects: the seam must hold.
    let publisher = {
        let service = server.service.clone();
        tokio::spawn(async move {
            for n in 511..=700u64 {
                service.publish("pos-a", &json!({ "n": n })).await.unwrap();
                if n % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut a = rtk1(server.addr, "pos-a", Some((&epoch, 10))).await;
    let again = subscribed(&mut a, "pos-a").await;
    assert_eq!(again["recovered"], true, "{again}");
    assert_eq!(again["was_recovering"], true);
    assert_eq!(again["o"], 10);
    assert_eq!(again["e"], epoch.as_str());
    for n in 11..=700 {
        assert_eq!(next_pub(&mut a, "pos-a").await, (n, n));
    }
    tokio::time::timeout(WAIT, publisher)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(publish(&server, "pos-a", 701).await, Some(701));
    assert_eq!(next_pub(&mut a, "pos-a").await, (701, 701));

    // The verbatim client saw every payload as published, byte for byte, nothing else.
    for n in 1..=701u64 {
        let f = plain.recv_frame().await.expect("a frame");
        assert_eq!(f.opcode, 0x1);
        assert_eq!(
            String::from_utf8(f.payload).unwrap(),
            format!("{{\"n\":{n}}}")
        );
    }
    plain.assert_nothing_pending().await;
    let m = server.service.metrics();
    assert_eq!(m.recoveries_succeeded, 1);
    // The 500, and those published while it resubscribed.
    assert!((500..=690).contains(&m.recovered_publications), "{m:?}");
}

/// 50 clients drop and reconnect at random moments, 20 times each, while publications flow:
/// every client has every publication exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_dropping_at_random_get_every_publication_once_in_order() {
    const CLIENTS: u64 = 50;
    const ROUNDS: usize = 20;
    const TOTAL: u64 = 3_000;
    let server = start(builder().recovery_max_publications(5_000)).await;
    let mut clients = Vec::new();
    let mut epoch = String::new();
    for _ in 0..CLIENTS {
        let mut c = rtk1(server.addr, "pos-load", None).await;
        let s = subscribed(&mut c, "pos-load").await;
        assert_eq!(s["o"], 0);
        epoch = s["e"].as_str().unwrap().to_owned();
        clients.push(c);
    }
    let publisher = {
        let service = server.service.clone();
        tokio::spawn(async move {
            for n in 1..=TOTAL {
                service
                    .publish("pos-load", &json!({ "n": n }))
                    .await
                    .unwrap();
                if n % 5 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    let addr = server.addr;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let epoch = epoch.clone();
            tokio::spawn(async move {
                let mut conn = Some(c);
                // xorshift, seeded per client: deterministic, no dependency.
                let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ (i as u64 + 1).wrapping_mul(7919);
                let mut next = move |bound: u64| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state % bound
                };
                let mut have = 0u64;
                for round in 0..=ROUNDS {
                    let mut c = match conn.take() {
                        Some(c) => c,
                        None => {
                            let mut c = rtk1(addr, "pos-load", Some((&epoch, have))).await;
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
                        let (o, n) = next_pub(&mut c, "pos-load").await;
                        assert_eq!((o, n), (have + 1, have + 1), "client {i} round {round}");
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
    tokio::time::timeout(WAIT, publisher)
        .await
        .unwrap()
        .unwrap();
    let m = server.service.metrics();
    assert_eq!(m.recoveries_succeeded, CLIENTS * ROUNDS as u64);
    assert_eq!(m.recoveries_failed, 0);
}

/// After the client's next message (`subscribed`), publishes a marker and expects it as the
/// very next message: nothing was recovered.
async fn expect_nothing_recovered(server: &Server, c: &mut Client, topic: &str, marker: u64) {
    let offset = publish(server, topic, marker).await;
    let (o, n) = next_pub(c, topic).await;
    assert_eq!(
        (Some(o), n),
        (offset, marker),
        "only the live marker follows"
    );
}

/// A changed epoch, too many missed publications, and expired ones: `recovered: false` and
/// none of the publications, never a part of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_that_cannot_be_exact_is_refused_whole() {
    let server = start(builder()).await;
    let mut a = rtk1(server.addr, "pos-x", None).await;
    let epoch = subscribed(&mut a, "pos-x").await["e"]
        .as_str()
        .unwrap()
        .to_owned();
    publish(&server, "pos-x", 1).await;
    assert_eq!(next_pub(&mut a, "pos-x").await, (1, 1));
    a.abort();

    // Too many missed: the default limit is 300.
    for n in 2..=302 {
        publish(&server, "pos-x", n).await;
    }
    let mut a = rtk1(server.addr, "pos-x", Some((&epoch, 1))).await;
    let s = subscribed(&mut a, "pos-x").await;
    assert_eq!(s["recovered"], false, "{s}");
    assert_eq!(s["was_recovering"], true);
    assert_eq!(s["o"], 302, "the client starts again from the top");
    expect_nothing_recovered(&server, &mut a, "pos-x", 303).await;
    a.abort();

    // One missed but the history was removed: a new epoch.
    publish(&server, "pos-x", 304).await;
    assert!(server.service.remove_history("pos-x").await);
    let mut a = rtk1(server.addr, "pos-x", Some((&epoch, 303))).await;
    let s = subscribed(&mut a, "pos-x").await;
    assert_eq!(s["recovered"], false, "{s}");
    assert_ne!(s["e"], epoch.as_str());
    assert_eq!(s["o"], 0);
    let new_epoch = s["e"].as_str().unwrap().to_owned();
    expect_nothing_recovered(&server, &mut a, "pos-x", 1).await;
    a.abort();

    // A position past the top, and a made-up epoch: refused.
    for since in [(new_epoch.as_str(), 99), ("nonsense", 1)] {
        let mut a = rtk1(server.addr, "pos-x", Some(since)).await;
        let s = subscribed(&mut a, "pos-x").await;
        assert_eq!(s["recovered"], false, "{s}");
        a.abort();
    }
    assert_eq!(server.service.metrics().recoveries_failed, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_publications_are_not_recovered() {
    let server = start(positioned(TopicPolicy::history(
        100,
        Duration::from_millis(100),
    )))
    .await;
    let mut a = rtk1(server.addr, "pos-ttl", None).await;
    let epoch = subscribed(&mut a, "pos-ttl").await["e"]
        .as_str()
        .unwrap()
        .to_owned();
    publish(&server, "pos-ttl", 1).await;
    assert_eq!(next_pub(&mut a, "pos-ttl").await, (1, 1));
    a.abort();
    publish(&server, "pos-ttl", 2).await;
    // Past the TTL, whatever the machine's speed: the publication has expired.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut a = rtk1(server.addr, "pos-ttl", Some((&epoch, 1))).await;
    let s = subscribed(&mut a, "pos-ttl").await;
    assert_eq!(s["recovered"], false, "{s}");
    assert_eq!(
        s["e"],
        epoch.as_str(),
        "the epoch outlives its publications"
    );
    assert_eq!(s["o"], 2);
    expect_nothing_recovered(&server, &mut a, "pos-ttl", 3).await;
}

/// History pages, the stream's top, and topics without a policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_top_read_the_stream() {
    let server = start(builder()).await;
    let service = &server.service;
    assert_eq!(service.stream_top("plain").await, None);
    assert_eq!(service.history("plain", None, 10, false).await, None);
    assert_eq!(publish(&server, "plain", 1).await, None);
    assert_eq!(service.metrics().unpositioned_publishes, 1);
    let top = service.stream_top("pos-h").await.unwrap();
    assert_eq!(top.offset, 0);
    for n in 1..=20 {
        publish(&server, "pos-h", n).await;
    }
    let page = service.history("pos-h", Some(5), 3, false).await.unwrap();
    assert_eq!(page.top.offset, 20);
    assert_eq!(page.top.epoch, top.epoch);
    let got: Vec<(u64, Value)> = page
        .publications
        .iter()
        .map(|p| (p.offset, serde_json::from_slice(&p.payload).unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            (6, json!({"n":6})),
            (7, json!({"n":7})),
            (8, json!({"n":8}))
        ]
    );
    let newest = service.history("pos-h", None, 2, true).await.unwrap();
    let offsets: Vec<u64> = newest.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, vec![20, 19]);
}

/// `subscribe` and `unsubscribe` commands, authorised by the application's rule; the `rtk1`
/// subprotocol header is echoed; invalid `rtk1` requests are refused with 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_unsubscribe_commands() {
    let server = start(builder()).await;
    let (status, head, client) = support::try_connect_head(
        server.addr,
        &format!("/ws/pos-c?token={ALICE}"),
        &[("Sec-WebSocket-Protocol", "rtk1")],
    )
    .await;
    assert_eq!(status, 101);
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: rtk1"),
        "{head}"
    );
    let mut a = client.unwrap();
    subscribed(&mut a, "pos-c").await;

    // A topic without history: no position, payloads that are not JSON become strings.
    a.send_text(&json!({"type":"subscribe","topic":"other"}).to_string())
        .await;
    let s = subscribed(&mut a, "other").await;
    assert_eq!(s["recoverable"], false);
    server
        .service
        .publish_raw("other", "plain text")
        .await
        .unwrap();
    let m = a.recv_json().await;
    assert_eq!(m, json!({"type":"pub","topic":"other","d":"plain text"}));

    // A positioned topic, recovering from a position.
    let epoch = server.service.stream_top("pos-d").await.unwrap().epoch;
    for n in 1..=3 {
        publish(&server, "pos-d", n).await;
    }
    let since = json!({"type":"subscribe","topic":"pos-d","since":{"o":1,"e":epoch}});
    a.send_text(&since.to_string()).await;
    let s = subscribed(&mut a, "pos-d").await;
    assert_eq!(s["recovered"], true, "{s}");
    assert_eq!(next_pub(&mut a, "pos-d").await, (2, 2));
    assert_eq!(next_pub(&mut a, "pos-d").await, (3, 3));

    // Refused by the rule, and a bad name: errors, the connection stays.
    a.send_text(&json!({"type":"subscribe","topic":"secret-x"}).to_string())
        .await;
    let e = a.recv_json().await;
    assert_eq!(e["type"], "error", "{e}");
    a.send_text(&json!({"type":"subscribe","topic":"bad topic"}).to_string())
        .await;
    assert_eq!(a.recv_json().await["type"], "error");

    // Not a command after all (no topic): the handler gets it, and refuses it.
    a.send_text(r#"{"type":"subscribe"}"#).await;
    assert_eq!(a.recv_json().await["type"], "error");
    // A plain client's messages are never taken as commands.
    let mut plain = support::connect(server.addr, "pos-c", BOB).await;
    plain
        .send_text(&json!({"type":"subscribe","topic":"pos-d"}).to_string())
        .await;
    let e = plain.recv_json().await;
    assert_eq!(e["type"], "error", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("Invalid message"),
        "{e}"
    );

    // Unsubscribed: nothing more of pos-d; the marker on pos-c comes next.
    a.send_text(&json!({"type":"unsubscribe","topic":"pos-d"}).to_string())
        .await;
    a.assert_nothing_pending().await;
    publish(&server, "pos-d", 4).await;
    publish(&server, "pos-c", 1).await;
    assert_eq!(next_pub(&mut a, "pos-c").await, (1, 1));

    // Application messages still reach the handler.
    a.send_text(&support::send_message("pos-c", "hi")).await;
    let m = a.recv_json().await;
    assert_eq!(m["type"], "pub");
    assert_eq!(m["d"]["NewMessage"]["text"], "hi");

    for bad in [
        "proto=rtk2",
        "proto=rtk1&since=5",
        "proto=rtk1&since=x&epoch=e",
    ] {
        let (status, _) =
            try_connect(server.addr, &format!("/ws/pos-c?token={ALICE}&{bad}"), &[]).await;
        assert_eq!(status, 400, "{bad}");
    }
}

/// Without a rule, subscribe commands are refused with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_commands_need_a_rule() {
    let server = start(support::chat::builder().shards(1)).await;
    let mut a = rtk1(server.addr, "room", None).await;
    let s = subscribed(&mut a, "room").await;
    assert_eq!(s["recoverable"], false);
    a.send_text(&json!({"type":"subscribe","topic":"other"}).to_string())
        .await;
    assert_eq!(a.recv_json().await["type"], "error");
}

/// A client that stops reading under `DropOldest` loses positioned publications: it is told
/// (`insufficient_state`), never left with a silent gap, and can subscribe again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_gets_insufficient_state_not_a_gap() {
    slow_consumer_is_told(SlowConsumerPolicy::DropOldest).await;
}

/// The same under `LatestPerTopic`, whose conflation drops a positioned topic's older frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflated_consumer_gets_insufficient_state_not_a_gap() {
    slow_consumer_is_told(SlowConsumerPolicy::LatestPerTopic).await;
}

async fn slow_consumer_is_told(policy: SlowConsumerPolicy) {
    let server = start(
        builder()
            .slow_consumer_policy(policy)
            .outbound_queue_bytes(64 * 1024),
    )
    .await;
    let mut a = rtk1(server.addr, "pos-slow", None).await;
    let epoch = subscribed(&mut a, "pos-slow").await["e"]
        .as_str()
        .unwrap()
        .to_owned();
    // Far more than socket buffers and the queue hold, while the client reads nothing.
    let pad = "x".repeat(4096);
    const TOTAL: u64 = 4_000;
    for n in 1..=TOTAL {
        server
            .service
            .publish("pos-slow", &json!({ "n": n, "pad": pad }))
            .await
            .unwrap();
    }
    support::wait_until("a positioned frame dropped", || {
        server.service.metrics().insufficient_state_slow_consumer > 0
    })
    .await;
    // Publications before the notice are contiguous from 1; after it, the client ignores
    // the topic's publications until it has subscribed again.
    let mut have = 0u64;
    let told = loop {
        let m = a.recv_json().await;
        match m["type"].as_str() {
            Some("pub") => {
                assert_eq!(m["o"], have + 1, "no gap before the notice");
                have += 1;
            }
            Some("insufficient_state") => {
                assert_eq!(m["topic"], "pos-slow");
                break true;
            }
            _ => panic!("unexpected {m}"),
        }
    };
    assert!(told);
    assert!(have < TOTAL);
    let since = json!({"type":"subscribe","topic":"pos-slow","since":{"o":have,"e":epoch}});
    a.send_text(&since.to_string()).await;
    let s = loop {
        let m = a.recv_json().await;
        if m["type"] == "subscribed" {
            break m;
        }
        assert_eq!(m["type"], "pub", "{m}");
    };
    // The backlog is larger than a recovery may re-send: explicit, not partial.
    assert_eq!(s["recovered"], false, "{s}");
    assert_eq!(s["o"], TOTAL);
    publish(&server, "pos-slow", TOTAL + 1).await;
    assert_eq!(next_pub(&mut a, "pos-slow").await, (TOTAL + 1, TOTAL + 1));
    assert_eq!(server.service.metrics().insufficient_state_slow_consumer, 1);
}

/// `basic_chat`: the rooms are positioned topics. An `rtk1` client reconnects with its
/// position and gets the messages it missed; a plain client sees exactly today's frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_chat_rooms_recover_for_rtk1_clients() {
    let server = support::basic_chat(2, None);
    let addr = server.addr;
    let mut plain = support::connect(addr, "general", BOB).await;
    let mut a = rtk1(addr, "general", None).await;
    let s = subscribed(&mut a, "general").await;
    assert_eq!(s["recoverable"], true, "{s}");
    let epoch = s["e"].as_str().unwrap().to_owned();
    let top = s["o"].as_u64().unwrap();
    // The room tracks presence: an rtk1 client hears its own user join.
    assert_eq!(a.recv_json().await["type"], "join");

    a.send_text(&support::send_message("general", "first"))
        .await;
    let m = a.recv_json().await;
    assert_eq!(m["type"], "pub");
    assert_eq!(m["o"], top + 1);
    assert_eq!(m["d"]["NewMessage"]["text"], "first");
    a.abort();

    for text in ["second", "third"] {
        plain
            .send_text(&support::send_message("general", text))
            .await;
    }
    for (user, text) in [("alice", "first"), ("bob", "second"), ("bob", "third")] {
        assert_eq!(
            plain.recv_json().await,
            json!({"NewMessage":{"room":"general","username":user,"text":text}})
        );
    }
    let mut a = rtk1(addr, "general", Some((&epoch, top + 1))).await;
    let s = subscribed(&mut a, "general").await;
    assert_eq!(s["recovered"], true, "{s}");
    for (i, text) in ["second", "third"].into_iter().enumerate() {
        let m = a.recv_json().await;
        assert_eq!(m["o"], top + 2 + i as u64, "{m}");
        assert_eq!(m["d"]["NewMessage"]["text"], text);
    }
    // Subscribe commands follow the rooms' rule: someone else's private topic is refused.
    a.send_text(
        &json!({"type":"subscribe","topic":"private-user-00000000-0000-0000-0000-000000000000"})
            .to_string(),
    )
    .await;
    assert_eq!(a.recv_json().await["type"], "error");
}
