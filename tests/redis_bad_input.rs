//! What another program may publish on the instances' Redis channels, and what the broker may
//! answer: a payload that is not UTF-8, a payload no subscriber could queue. Each test starts its
//! own `redis-server` on a free port (see `support::redis_server`).

mod support;

use axum_realtime_kit::PublishError;
use axum_realtime_kit::bench_api::open_router;
use axum_realtime_kit::prelude::*;
use axum_realtime_kit::ws::types::SendError;
use redis::AsyncCommands;
use serde_json::json;
use support::redis_server::start_redis;
use support::*;

macro_rules! redis_or_skip {
    ($name:expr) => {
        match start_redis($name) {
            Some(r) => r,
            None => return,
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_is_not_utf8_arrives_as_a_binary_frame_and_nothing_closes() {
    let redis = redis_or_skip!("a_publish_that_is_not_utf8_arrives_as_a_binary_frame");
    let a = chat_server_with(Some(redis.url()), 2).await;
    let mut first = connect(a.addr, "general", ALICE).await;
    let mut second = connect(a.addr, "general", BOB).await;
    let mut c = redis.client().await;
    let bad: &[u8] = b"\xff\xfe not UTF-8 \xc3";
    let _: i64 = c.publish("general", bad).await.unwrap();
    let _: i64 = c.publish("general", "after").await.unwrap();
    for client in [&mut first, &mut second] {
        let f = client.recv_frame().await.unwrap();
        assert_eq!((f.opcode, &f.payload[..]), (0x2, bad));
        let f = client.recv_frame().await.unwrap();
        assert_eq!((f.opcode, &f.payload[..]), (0x1, &b"after"[..]));
        client.assert_nothing_pending().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_larger_than_the_outbound_queue_is_dropped_and_counted() {
    let redis = redis_or_skip!("a_publish_larger_than_the_outbound_queue_is_dropped_and_counted");
    let service = chat::builder()
        .redis_url(Some(redis.url()))
        .shards(2)
        .outbound_queue_bytes(4096)
        .build();
    let a = serve_chat(service).await;
    wait_ready(&a.service).await;
    let mut first = connect(a.addr, "general", ALICE).await;
    let mut second = connect(a.addr, "general", BOB).await;
    let mut c = redis.client().await;
    let _: i64 = c.publish("general", "x".repeat(8192)).await.unwrap();
    let _: i64 = c.publish("general", "next").await.unwrap();
    for client in [&mut first, &mut second] {
        let f = client.recv_frame().await.unwrap();
        assert!(
            f.opcode == 0x1 && f.payload == b"next",
            "expected \"next\", got opcode {:#x} with {} bytes",
            f.opcode,
            f.payload.len()
        );
        client.assert_nothing_pending().await;
    }
    assert_eq!(a.service.metrics().broker_oversized_drops, 1);
    assert_eq!(a.service.metrics().slow_consumer_closes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_raw_refuses_a_payload_that_is_not_utf8() {
    let redis = redis_or_skip!("publish_raw_refuses_a_payload_that_is_not_utf8");
    let a = chat_server_with(Some(redis.url()), 1).await;
    let mut client = connect(a.addr, "general", ALICE).await;
    let res = a.service.publish_raw("general", &b"\xff\xfe"[..]).await;
    assert!(matches!(res, Err(PublishError::NotText)), "{res:?}");
    a.service.publish_raw("general", "fine").await.unwrap();
    let f = client.recv_frame().await.unwrap();
    assert_eq!((f.opcode, &f.payload[..]), (0x1, &b"fine"[..]));
    // The in-process broker refuses it too.
    let local = chat_server_with(None, 1).await;
    let res = local.service.publish_raw("general", &b"\xc3"[..]).await;
    assert!(matches!(res, Err(PublishError::NotText)), "{res:?}");
}

/// Joins the topic a client names (`{"join": "t"}`) and answers how it went.
#[derive(Debug)]
struct JoinOne;

#[async_trait::async_trait]
impl MessageHandler for JoinOne {
    type ClientMessage = serde_json::Value;
    type ServerEvent = serde_json::Value;
    type AppState = ();
    type UserId = u32;

    async fn handle_direct_message(
        &self,
        msg: &serde_json::Value,
        ctx: &ConnectionContext<(), u32>,
    ) -> Result<Option<serde_json::Value>, HandlerError> {
        let topic = msg["join"].as_str().unwrap_or_default();
        Ok(Some(match ctx.sink.join(topic).await {
            Ok(()) => json!({ "joined": topic }),
            Err(e) => json!({
                "refused": refused_by_broker(&e),
                "error": e.to_string(),
            }),
        }))
    }

    async fn handle_broadcast_message(
        &self,
        _msg: serde_json::Value,
        _ctx: &ConnectionContext<(), u32>,
    ) -> Result<Option<serde_json::Value>, HandlerError> {
        Ok(None)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_the_redis_user_may_not_subscribe_is_refused_and_the_rest_works() {
    let redis = redis_or_skip!("a_channel_the_redis_user_may_not_subscribe_is_refused");
    let mut admin = redis.client().await;
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "limited",
            "on",
            ">secret",
            "resetchannels",
            "&open:*",
            "&__rtk_probe:*",
            "+@all",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = format!("redis://limited:secret@127.0.0.1:{}/", redis.port);
    let service = WebsocketService::builder(JoinOne, std::sync::Arc::new(()))
        .redis_url(Some(url))
        .build();
    let addr = serve(open_router(service.clone(), 1)).await;
    wait_ready(&service).await;
    let reconnects = service.metrics().broker_reconnects;

    let (_, client) = try_connect(addr, "/ws/open:lobby", &[]).await;
    let mut client = client.unwrap();
    client
        .send_text(&json!({ "join": "closed:secret" }).to_string())
        .await;
    let reply = client.recv_json().await;
    assert_eq!(reply["refused"], true, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("NOPERM"),
        "{reply}"
    );
    client
        .send_text(&json!({ "join": "open:news" }).to_string())
        .await;
    assert_eq!(client.recv_json().await["joined"], "open:news");

    // Both allowed topics deliver, on the connection the refusal did not cost.
    let _: i64 = admin.publish("open:news", "news").await.unwrap();
    let _: i64 = admin.publish("open:lobby", "lobby").await.unwrap();
    for want in ["news", "lobby"] {
        let f = client.recv_frame().await.unwrap();
        assert_eq!(f.payload, want.as_bytes());
    }
    // A connection opened on the forbidden topic is closed with 1008 at once.
    let (status, refused) = try_connect(addr, "/ws/closed:other", &[]).await;
    assert_eq!(status, 101);
    assert_eq!(refused.unwrap().expect_close().await, 1008);
    // Nothing else is queued: the next frame answers this join of a topic already joined.
    client
        .send_text(&json!({ "join": "open:lobby" }).to_string())
        .await;
    assert_eq!(client.recv_json().await["joined"], "open:lobby");
    assert_eq!(service.metrics().broker_reconnects, reconnects);
    assert!(service.is_ready());
}

fn refused_by_broker(e: &SendError) -> bool {
    matches!(e, SendError::TopicRefused(_))
}
