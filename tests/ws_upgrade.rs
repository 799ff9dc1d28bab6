//! The upgrade request itself: what a client that gives up during it leaves behind.

mod support;

use std::time::Duration;

use support::redis_server::start_redis;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends an upgrade request for `topic`, shuts the write side at once and reads until the server
/// has closed the connection (bounded by [`WAIT`]); returns what the server sent, if anything.
async fn upgrade_and_hang_up(addr: std::net::SocketAddr, topic: &str) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws/{topic}?token={ALICE} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut got))
        .await
        .expect("the server kept the hung-up connection open")
        .ok();
    got
}

async fn redis_channels(redis: &redis_server::RedisServer, pattern: &str) -> Vec<String> {
    let mut c = redis.client().await;
    redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(pattern)
        .query_async(&mut c)
        .await
        .unwrap()
}

/// With Redis slow to confirm subscriptions, clients that send the upgrade request and hang up
/// at once (before the 101) must leave nothing behind: no local subscription, no Redis channel,
/// no connection slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_during_the_upgrade_leaves_no_subscription() {
    const N: usize = 20;
    let Some(redis) =
        start_redis("a_client_that_hangs_up_during_the_upgrade_leaves_no_subscription")
    else {
        return;
    };
    let service = chat::builder()
        .redis_url(Some(redis.url()))
        .shards(2)
        .max_connections(N)
        .build();
    let server = serve_chat(service).await;
    wait_ready(&server.service).await;

    // Redis stops answering: every join now waits for its SUBSCRIBE confirmation.
    redis.signal("STOP");
    for i in 0..N {
        let got = upgrade_and_hang_up(server.addr, &format!("gone-{i}")).await;
        assert!(
            !got.starts_with(b"HTTP/1.1 101"),
            "the hung-up client was answered 101: its request was not dropped on hang-up"
        );
    }
    redis.signal("CONT");

    let svc = server.service.clone();
    wait_until(
        "every subscription of the hung-up clients undone",
        move || svc.metrics().subscriptions == 0,
    )
    .await;
    assert_eq!(server.service.metrics().connections_active, 0);
    let ok = tokio::time::timeout(WAIT, async {
        while !redis_channels(&redis, "gone-*").await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        ok.is_ok(),
        "Redis still has channels {:?}",
        redis_channels(&redis, "gone-*").await
    );
    // Every connection slot came back: N more clients are admitted.
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(connect(server.addr, "general", BOB).await);
    }
    clients[0].assert_nothing_pending().await;
}
