//! Presence scenarios, run on one instance (in-process broker: `a` and `b` are the same server)
//! and on two instances sharing a Redis. Every scenario reads the observer's frames in order and
//! asserts the exact next one, so a `join` or `leave` too many fails it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum_realtime_kit::ws::service::WebsocketService;
use axum_realtime_kit::{PresenceError, TopicPolicy, WebsocketServiceBuilder};
use serde_json::{Value, json};

use super::chat::ChatHandler;
use super::{Client, Server, WAIT, try_connect};

/// Topics starting with `room` keep history and track presence; a user is their name, with
/// `{"name": …}` as info.
pub fn builder(grace: Duration) -> WebsocketServiceBuilder<ChatHandler> {
    super::chat::builder()
        .shards(2)
        .topic_policy(|topic| {
            topic
                .starts_with("room")
                .then(|| TopicPolicy::history(100, Duration::from_secs(60)).presence(true))
        })
        .presence_user(|name: &String| (name.clone(), json!({ "name": name })))
        .presence_leave_grace(grace)
}

/// Opens `topic` as `user` speaking `rtk1`; its `subscribed` message is read.
pub async fn rtk1(addr: SocketAddr, topic: &str, user: &str) -> Client {
    let path = format!("/ws/{topic}?token=id:{user}&proto=rtk1");
    let (status, client) = try_connect(addr, &path, &[]).await;
    assert_eq!(status, 101, "upgrade to {path} refused");
    let mut client = client.unwrap();
    let m = client.recv_json().await;
    assert_eq!(m["type"], "subscribed", "{m}");
    client
}

/// Opens `topic` as `user` without `rtk1`.
pub async fn plain(addr: SocketAddr, topic: &str, user: &str) -> Client {
    super::connect(addr, topic, &format!("id:{user}")).await
}

/// The next message, which must be `kind` (`join`/`leave`) of `user` in `topic`.
pub async fn expect_event(c: &mut Client, kind: &str, topic: &str, user: &str) {
    let m = c.recv_json().await;
    assert_eq!(m["type"], kind, "expected {kind} of {user}, got {m}");
    assert_eq!(m["topic"], topic, "{m}");
    assert_eq!(m["user"], user, "expected {kind} of {user}, got {m}");
    assert_eq!(m["info"], json!({ "name": user }), "{m}");
}

/// Closes cleanly: a close frame, then the server's, then the end of the stream.
pub async fn close(mut c: Client) {
    c.finish_close().await;
}

/// Waits until `service` counts `users` users and `connections` connections in `topic`.
pub async fn wait_stats(
    service: &Arc<WebsocketService<ChatHandler>>,
    topic: &str,
    users: u64,
    connections: u64,
) {
    let mut last = None;
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            let stats = service.presence_stats(topic).await.unwrap();
            if (stats.users, stats.connections) == (users, connections) {
                return;
            }
            last = Some(stats);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "{topic}: wanted {users} users and {connections} connections, last {last:?}"
    );
}

/// Every page of `topic`'s presence, as (user, connections, info), sorted by user.
pub async fn listing(
    service: &Arc<WebsocketService<ChatHandler>>,
    topic: &str,
    limit: usize,
) -> Vec<(String, u64, Value)> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = service
            .presence(topic, cursor.as_deref(), limit)
            .await
            .unwrap();
        all.extend(
            page.users
                .into_iter()
                .map(|u| (u.user, u.connections, u.info)),
        );
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    all.sort_by(|x, y| x.0.cmp(&y.0));
    all.dedup_by(|x, y| x.0 == y.0);
    all
}

/// Users on both instances appear on both; one `join` per user however many connections, one
/// `leave` once the last one closed; clients without `rtk1` see none of it.
pub async fn one_join_per_user_and_one_leave_after_the_last(a: &Server, b: &Server) {
    let topic = "room-tabs";
    let mut obs = rtk1(a.addr, topic, "obs").await;
    expect_event(&mut obs, "join", topic, "obs").await;
    let mut verbatim = plain(b.addr, topic, "plain").await;
    expect_event(&mut obs, "join", topic, "plain").await;

    // Alice opens three tabs, on both instances, two speaking rtk1: one join.
    let tab1 = rtk1(a.addr, topic, "alice").await;
    expect_event(&mut obs, "join", topic, "alice").await;
    let tab2 = rtk1(b.addr, topic, "alice").await;
    let tab3 = plain(a.addr, topic, "alice").await;
    let bob = rtk1(b.addr, topic, "bob").await;
    expect_event(&mut obs, "join", topic, "bob").await;

    for server in [a, b] {
        wait_stats(&server.service, topic, 4, 6).await;
        let name = |n: &str| json!({ "name": n });
        let want = vec![
            ("alice".to_string(), 3, name("alice")),
            ("bob".to_string(), 1, name("bob")),
            ("obs".to_string(), 1, name("obs")),
            ("plain".to_string(), 1, name("plain")),
        ];
        assert_eq!(listing(&server.service, topic, 100).await, want);
        // Pages of one user each give the same users.
        assert_eq!(listing(&server.service, topic, 1).await, want);
    }

    // The rtk1 request answers the same list.
    obs.send_text(&json!({ "type": "presence", "topic": topic }).to_string())
        .await;
    let reply = obs.recv_json().await;
    assert_eq!(reply["type"], "presence", "{reply}");
    assert_eq!(reply["topic"], topic);
    let mut users: Vec<(String, u64)> = reply["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            assert_eq!(u["info"]["name"], u["user"], "{u}");
            (
                u["user"].as_str().unwrap().to_string(),
                u["connections"].as_u64().unwrap(),
            )
        })
        .collect();
    users.sort();
    let want = [("alice", 3), ("bob", 1), ("obs", 1), ("plain", 1)];
    let want: Vec<(String, u64)> = want.iter().map(|(u, n)| (u.to_string(), *n)).collect();
    assert_eq!(users, want);

    // Two tabs close: Alice is still there. The third: she leaves, once.
    close(tab1).await;
    close(tab3).await;
    wait_stats(&a.service, topic, 4, 4).await;
    close(tab2).await;
    expect_event(&mut obs, "leave", topic, "alice").await;
    close(bob).await;
    expect_event(&mut obs, "leave", topic, "bob").await;
    wait_stats(&b.service, topic, 2, 2).await;

    // The client without rtk1 saw no join or leave: its next frame is the next publication.
    a.service.publish(topic, &json!({ "n": 1 })).await.unwrap();
    assert_eq!(verbatim.recv_json().await, json!({ "n": 1 }));
    let m = obs.recv_json().await;
    assert_eq!(
        (m["type"].clone(), m["d"].clone()),
        (json!("pub"), json!({ "n": 1 }))
    );
}

/// A connection that drops without a close stays present for the grace: a reconnect within it
/// causes no leave and join; one that does not come back leaves after it.
pub async fn a_dropped_connection_leaves_after_the_grace_unless_it_reconnects(
    a: &Server,
    b: &Server,
) {
    let topic = "room-grace";
    let mut obs = rtk1(a.addr, topic, "obs").await;
    expect_event(&mut obs, "join", topic, "obs").await;
    let alice = rtk1(a.addr, topic, "alice").await;
    expect_event(&mut obs, "join", topic, "alice").await;

    // The TCP connection drops; the client reconnects at once, to the other instance.
    alice.abort();
    let alice = rtk1(b.addr, topic, "alice").await;
    // The dropped connection goes once the grace is over...
    wait_stats(&a.service, topic, 2, 2).await;
    // ...and Alice never left: the next event is Carol's join.
    let carol = rtk1(b.addr, topic, "carol").await;
    expect_event(&mut obs, "join", topic, "carol").await;

    // Dropped for good: Alice leaves after the grace.
    alice.abort();
    expect_event(&mut obs, "leave", topic, "alice").await;
    close(carol).await;
    expect_event(&mut obs, "leave", topic, "carol").await;
}

/// Presence of a topic that does not track it is an error: typed on the API, an error message
/// on the wire.
pub async fn presence_of_a_topic_without_it_is_an_error(a: &Server) {
    for topic in ["general", "room-x"] {
        let enabled = topic.starts_with("room");
        let page = a.service.presence(topic, None, 10).await;
        let stats = a.service.presence_stats(topic).await;
        if enabled {
            assert!(page.unwrap().users.is_empty());
            let zero = stats.unwrap();
            assert_eq!((zero.users, zero.connections), (0, 0));
        } else {
            assert_eq!(page.unwrap_err(), PresenceError::NotEnabled);
            assert_eq!(stats.unwrap_err(), PresenceError::NotEnabled);
        }
    }
    let mut c = rtk1(a.addr, "general", "alice").await;
    c.send_text(r#"{"type":"presence","topic":"general"}"#)
        .await;
    let m = c.recv_json().await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["topic"], "general", "{m}");
    let message = m["message"].as_str().unwrap();
    assert!(message.contains("does not track presence"), "{m}");
    // No presence frames on a topic without it, and the connection goes on.
    c.assert_nothing_pending().await;
}

/// A graceful shutdown of `b` makes its users leave at once, seen on `a`.
pub async fn a_graceful_shutdown_leaves_at_once(a: &Server, b: &Server) {
    let topic = "room-shutdown";
    let mut obs = rtk1(a.addr, topic, "obs").await;
    expect_event(&mut obs, "join", topic, "obs").await;
    let _alice = rtk1(b.addr, topic, "alice").await;
    expect_event(&mut obs, "join", topic, "alice").await;
    b.service.shutdown().await;
    expect_event(&mut obs, "leave", topic, "alice").await;
    wait_stats(&a.service, topic, 1, 1).await;
}

/// Polls the example's `GET /presence/{topic}` (as `token`) until `done` holds for its JSON
/// body; returns that body.
pub async fn poll_presence(
    port: u16,
    topic: &str,
    token: &str,
    mut done: impl FnMut(&Value) -> bool,
) -> Value {
    let auth = format!("Bearer {token}");
    let path = format!("/presence/{topic}");
    let mut last = Value::Null;
    let found = tokio::time::timeout(WAIT, async {
        loop {
            let headers = [("Authorization", auth.as_str())];
            let (status, body) = super::browser::http(port, "GET", &path, &headers, None).unwrap();
            assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
            last = serde_json::from_slice(&body).unwrap();
            if done(&last) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(found.is_ok(), "{path}: last answer {last}");
    last
}

/// Twenty tabs of one user open at once, half on each instance: one `join`; all closed at
/// once: one `leave`.
pub async fn tabs_opened_and_closed_at_once_give_one_join_and_one_leave(a: &Server, b: &Server) {
    let topic = "room-rush";
    let mut obs = rtk1(a.addr, topic, "obs").await;
    expect_event(&mut obs, "join", topic, "obs").await;
    let opening = (0..20).map(|i| {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        tokio::spawn(async move { rtk1(addr, topic, "alice").await })
    });
    let mut tabs = Vec::new();
    for tab in futures_util::future::join_all(opening).await {
        tabs.push(tab.unwrap());
    }
    wait_stats(&a.service, topic, 2, 21).await;
    wait_stats(&b.service, topic, 2, 21).await;
    let closing = tabs.into_iter().map(|tab| tokio::spawn(close(tab)));
    for closed in futures_util::future::join_all(closing).await {
        closed.unwrap();
    }
    wait_stats(&b.service, topic, 1, 1).await;
    // Bob's join comes after exactly one join and one leave of Alice.
    let _bob = rtk1(b.addr, topic, "bob").await;
    expect_event(&mut obs, "join", topic, "alice").await;
    expect_event(&mut obs, "leave", topic, "alice").await;
    expect_event(&mut obs, "join", topic, "bob").await;
}

/// Two `basic_chat` processes on `redis_url`, entries living 1.5 s: the instance killed with
/// SIGKILL has its user leave, seen on the other, whose users stay. `ready_wait` bounds each
/// instance's start.
pub async fn a_killed_instances_users_leave(redis_url: String, ready_wait: Duration) {
    use super::{ALICE, ALICE_ID, BOB, free_port, spawn_example};
    let bob_id = "b1b2b3b4-a1a2-b1b2-c1c2-c3c4c5c6c7c8";
    let (pa, pb) = (free_port(), free_port());
    let env = [("REDIS_URL", redis_url), ("PRESENCE_TTL_MS", "1500".into())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _a = spawn_example("basic_chat", pa, &env);
    let b = spawn_example("basic_chat", pb, &env);
    for port in [pa, pb] {
        super::browser::poll("instance ready", ready_wait, || {
            let ready = super::browser::http(port, "GET", "/ready", &[], None);
            ready.is_ok_and(|(s, _)| s == 200).then_some(())
        });
    }
    let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let open = |port: u16, token: &'static str| async move {
        let path = format!("/ws/general?token={token}&proto=rtk1");
        let (status, client) = try_connect(addr(port), &path, &[]).await;
        assert_eq!(status, 101);
        let mut client = client.unwrap();
        assert_eq!(client.recv_json().await["type"], "subscribed");
        client
    };
    let mut alice = open(pa, ALICE).await;
    let next = |m: serde_json::Value| (m["type"].clone(), m["user"].clone(), m["info"].clone());
    let join = |id: &str, name: &str| (json!("join"), json!(id), json!({ "name": name }));
    assert_eq!(next(alice.recv_json().await), join(ALICE_ID, "alice"));
    let _bob = open(pb, BOB).await;
    assert_eq!(next(alice.recv_json().await), join(bob_id, "bob"));

    drop(b); // SIGKILL: no shutdown, its entries stay until they expire.
    let left = next(alice.recv_json().await);
    assert_eq!(
        left,
        (json!("leave"), json!(bob_id), json!({ "name": "bob" }))
    );
    let body = poll_presence(pa, "general", ALICE, |_| true).await;
    assert_eq!(body["stats"], json!({"users": 1, "connections": 1}));
    assert_eq!(body["users"][0]["user"], ALICE_ID);
}
