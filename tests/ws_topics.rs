//! Which topics a connection may be in: names the kit reserves for itself, and how many topics
//! one connection may join.

mod support;

use std::sync::Arc;

use async_trait::async_trait;
use axum_realtime_kit::WebsocketServiceBuilder;
use axum_realtime_kit::bench_api::open_router;
use axum_realtime_kit::prelude::*;
use serde_json::{Value, json};
use support::*;

// `{"join": ["t1", …], "leave": ["t2", …]}`: leaves, then joins every listed topic at once and
// answers `{"join": [r1, …]}`, each `"ok"` or the `SendError` (Debug) of that join.
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
        for topic in names("leave") {
            ctx.sink.leave(&topic).await;
        }
        let joins = names("join");
        let results = futures_util::future::join_all(joins.iter().map(|t| ctx.sink.join(t))).await;
        let results: Vec<String> = results
            .into_iter()
            .map(|r| match r {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("{e:?}"),
            })
            .collect();
        Ok(Some(json!({ "join": results })))
    }

    async fn handle_broadcast_message(
        &self,
        _msg: Value,
        _ctx: &ConnectionContext<(), u32>,
    ) -> Result<Option<Value>, HandlerError> {
        Ok(None)
    }
}

async fn joiner_server(
    configure: impl FnOnce(WebsocketServiceBuilder<Joiner>) -> WebsocketServiceBuilder<Joiner>,
) -> (std::net::SocketAddr, Arc<WebsocketService<Joiner>>) {
    let service = configure(WebsocketService::builder(Joiner, Arc::new(()))).build();
    let addr = support::serve(open_router(service.clone(), 1)).await;
    (addr, service)
}

async fn join(client: &mut Client, topics: &[&str], leave: &[&str]) -> Vec<String> {
    client
        .send_text(&json!({ "join": topics, "leave": leave }).to_string())
        .await;
    let reply = client.recv_json().await;
    serde_json::from_value(reply["join"].clone()).expect("a list of results")
}

#[tokio::test]
async fn the_kits_own_channel_names_are_refused_as_topics() {
    let (addr, service) = joiner_server(|b| b).await;
    for topic in ["__rtk_probe:x", "__rtk", "__rtkanything"] {
        let (status, _) = try_connect(addr, &format!("/ws/{topic}"), &[]).await;
        assert_eq!(status, 400, "upgrade to reserved topic {topic}");
    }
    let (status, client) = try_connect(addr, "/ws/general", &[]).await;
    assert_eq!(status, 101);
    let mut client = client.unwrap();
    let results = join(
        &mut client,
        &["__rtk_probe:0000000000000001", "_rtk", "rtk__x"],
        &[],
    )
    .await;
    assert!(results[0].starts_with("InvalidTopic"), "{results:?}");
    assert_eq!(results[1..], ["ok", "ok"], "{results:?}");
    // Nothing subscribed for the refused name; the connection stays open.
    assert_eq!(service.metrics().subscriptions, 3);
    assert_eq!(join(&mut client, &[], &[]).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_joins_at_most_128_topics_even_when_joining_concurrently() {
    let (addr, service) = joiner_server(|b| b.shards(2)).await;
    let (status, client) = try_connect(addr, "/ws/first", &[]).await;
    assert_eq!(status, 101);
    let mut client = client.unwrap();

    // 200 joins at once, on top of the topic the connection opened with: 127 fit.
    let names: Vec<String> = (0..200).map(|i| format!("t{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let results = join(&mut client, &refs, &[]).await;
    let ok = results.iter().filter(|r| *r == "ok").count();
    assert_eq!(ok, 127, "{results:?}");
    assert!(
        results.iter().all(|r| r == "ok" || r == "TooManyTopics"),
        "{results:?}"
    );
    assert_eq!(service.metrics().subscriptions, 128);

    // At the limit, joining a topic it is already in is still a no-op that succeeds.
    assert_eq!(join(&mut client, &["first"], &[]).await, ["ok"]);
    // Leaving 10 makes room for exactly 10 of 30 concurrent joins.
    let joined: Vec<&str> = refs
        .iter()
        .zip(&results)
        .filter(|(_, r)| *r == "ok")
        .map(|(t, _)| *t)
        .take(10)
        .collect();
    let more: Vec<String> = (0..30).map(|i| format!("u{i}")).collect();
    let more: Vec<&str> = more.iter().map(String::as_str).collect();
    let results = join(&mut client, &more, &joined).await;
    assert_eq!(
        results.iter().filter(|r| *r == "ok").count(),
        10,
        "{results:?}"
    );
    assert_eq!(service.metrics().subscriptions, 128);
    // The connection stays open.
    assert_eq!(join(&mut client, &[], &[]).await, Vec::<String>::new());
}

#[tokio::test]
async fn the_topic_limit_is_a_builder_setting() {
    let (addr, _service) = joiner_server(|b| b.max_topics_per_connection(2)).await;
    let (_, client) = try_connect(addr, "/ws/first", &[]).await;
    let mut client = client.unwrap();
    assert_eq!(
        join(&mut client, &["a", "b"], &[])
            .await
            .iter()
            .filter(|r| *r == "ok")
            .count(),
        1
    );
    assert_eq!(
        join(&mut client, &["c"], &["first", "a", "b"]).await,
        ["ok"]
    );
}
