//! Presence on one instance (in-process broker): who is in a topic, `join` when a user's first
//! connection arrives and `leave` when their last one left, the grace after a dropped
//! connection, and the error for a topic without presence. The same scenarios run on two
//! instances sharing a Redis in `presence_redis.rs`.

mod support;

use std::time::Duration;

use support::presence::{self as scenario, builder};
use support::{Server, serve_chat};

async fn instance(grace: Duration) -> Server {
    serve_chat(builder(grace).build()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_join_per_user_and_one_leave_after_the_last() {
    let a = instance(Duration::from_secs(5)).await;
    scenario::one_join_per_user_and_one_leave_after_the_last(&a, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_leaves_after_the_grace_unless_it_reconnects() {
    let a = instance(Duration::from_secs(2)).await;
    scenario::a_dropped_connection_leaves_after_the_grace_unless_it_reconnects(&a, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_a_topic_without_it_is_an_error() {
    let a = instance(Duration::from_secs(5)).await;
    scenario::presence_of_a_topic_without_it_is_an_error(&a).await;
}

/// `GET /presence/{topic}` on the example answers 401, 403 and 404 exactly where
/// `GET /ws/{topic}` does, and lists who is in the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_presence_route_is_authorised_like_its_websocket_route() {
    use support::{ALICE, ALICE_ID, BOB, try_connect};
    let example = support::basic_chat(2, None);
    let port = example.addr.port();
    let get = |path: String, token: Option<&str>| {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", &a[..])).collect();
        support::browser::http(port, "GET", &path, &headers, None).unwrap()
    };
    let bob_private = "private-user-b1b2b3b4-a1a2-b1b2-c1c2-c3c4c5c6c7c8";
    for (topic, token, status) in [
        ("general", None, 401),
        ("general", Some("not-a-token"), 401),
        (bob_private, Some(ALICE), 403),
        ("elsewhere", Some(ALICE), 404),
    ] {
        let (got, _) = get(format!("/presence/{topic}"), token);
        assert_eq!(got, status, "/presence/{topic} with {token:?}");
        let ws = match token {
            Some(t) => format!("/ws/{topic}?token={t}"),
            None => format!("/ws/{topic}"),
        };
        let (got, _) = try_connect(example.addr, &ws, &[]).await;
        assert_eq!(got, status, "{ws}");
    }
    // Bob may open his private topic, which has no presence.
    let (got, _) = get(format!("/presence/{bob_private}"), Some(BOB));
    assert_eq!(got, 404);

    let _alice = support::connect(example.addr, "general", ALICE).await;
    let _tab = support::connect(example.addr, "general", ALICE).await;
    let listed = support::presence::poll_presence(port, "general", BOB, |body| {
        body["stats"]["connections"] == 2
    })
    .await;
    assert_eq!(
        listed["stats"],
        serde_json::json!({"users": 1, "connections": 2})
    );
    assert_eq!(
        listed["users"],
        serde_json::json!([{"user": ALICE_ID, "connections": 2, "info": {"name": "alice"}}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tabs_opened_and_closed_at_once_give_one_join_and_one_leave() {
    let a = instance(Duration::from_secs(5)).await;
    scenario::tabs_opened_and_closed_at_once_give_one_join_and_one_leave(&a, &a).await;
}
