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
