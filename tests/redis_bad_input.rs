//! What another program may publish on the instances' Redis channels, and what the broker may
//! answer: a payload that is not UTF-8, a payload no subscriber could queue. Each test starts its
//! own `redis-server` on a free port (see `support::redis_server`).

mod support;

use axum_realtime_kit::PublishError;
use redis::AsyncCommands;
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
    let ready = a.service.clone();
    wait_until("instance ready", move || ready.is_ready()).await;
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
