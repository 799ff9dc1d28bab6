//! A client that stops reading meets its slow-consumer policy; everyone else gets everything, in
//! order.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum_realtime_kit::SlowConsumerPolicy;
use support::*;

const MESSAGES: usize = 4_000;
/// How far the publisher may run ahead of the slowest fast client: ≈ 200 KiB. A connection's
/// count of what it holds is brought up to date after each write, so it can trail the client
/// by one batch (at most a window): twice the window stays under the 512 KiB bound.
const WINDOW: usize = 50;

async fn serve(policy: SlowConsumerPolicy) -> Server {
    let service = chat::builder()
        .outbound_queue_bytes(512 * 1024)
        .slow_consumer_policy(policy)
        .build();
    serve_chat(service).await
}

fn payload(i: usize) -> String {
    format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(4000))
}

/// Publishes MESSAGES payloads while three fast clients read, never running more than WINDOW
/// messages ahead of the slowest of them (so they are never slow consumers themselves); returns
/// once they got all of them, in order. 16 MB in all: far more than socket buffers and the
/// stalled client's queue can hold.
async fn flow(server: &Server) {
    let progress: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
    let mut fast = Vec::new();
    for k in 0..3 {
        let mut c = connect(server.addr, "general", BOB).await;
        c.assert_nothing_pending().await;
        let progress = progress.clone();
        fast.push(tokio::spawn(async move {
            for i in 0..MESSAGES {
                assert_eq!(c.recv_json().await["n"], i, "fast client lost or reordered");
                progress[k].store(i + 1, Ordering::Release);
            }
        }));
    }
    for i in 0..MESSAGES {
        while progress
            .iter()
            .map(|p| p.load(Ordering::Acquire))
            .min()
            .unwrap()
            + WINDOW
            < i
        {
            // A fast client that failed stops reading: surface its panic instead of waiting.
            if let Some(k) = fast.iter().position(|f| f.is_finished()) {
                fast.swap_remove(k).await.unwrap();
                panic!("a fast client stopped before message {i}");
            }
            tokio::task::yield_now().await;
        }
        server
            .service
            .publish_raw("general", payload(i))
            .await
            .unwrap();
    }
    for f in fast {
        f.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_policy_closes_the_stalled_client_with_1008() {
    let server = serve(SlowConsumerPolicy::Close).await;
    let mut stalled = connect(server.addr, "general", ALICE).await;
    flow(&server).await;
    assert_eq!(server.service.metrics().slow_consumer_closes, 1);
    // What the kernel buffered arrives, then the close.
    assert_eq!(stalled.expect_close().await, 1008);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_the_stalled_client_with_a_gap() {
    let server = serve(SlowConsumerPolicy::DropOldest).await;
    let mut stalled = connect(server.addr, "general", ALICE).await;
    flow(&server).await;
    assert!(server.service.metrics().slow_consumer_drops > 0);
    assert_eq!(server.service.metrics().slow_consumer_closes, 0);
    // It reads now: increasing numbers with at least one gap, ending with the newest.
    let mut last = None;
    let mut gaps = 0;
    loop {
        let n = stalled.recv_json().await["n"].as_u64().unwrap() as usize;
        if let Some(prev) = last {
            assert!(n > prev, "reordered: {n} after {prev}");
            if n != prev + 1 {
                gaps += 1;
            }
        }
        last = Some(n);
        if n == MESSAGES - 1 {
            break;
        }
    }
    assert!(gaps >= 1);
    stalled.assert_nothing_pending().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_per_topic_delivers_the_newest_message_of_the_topic() {
    let server = serve(SlowConsumerPolicy::LatestPerTopic).await;
    let mut stalled = connect(server.addr, "general", ALICE).await;
    flow(&server).await;
    assert!(server.service.metrics().slow_consumer_drops > 0);
    let mut last = 0;
    while last != MESSAGES - 1 {
        let n = stalled.recv_json().await["n"].as_u64().unwrap() as usize;
        assert!(n >= last);
        last = n;
    }
    stalled.assert_nothing_pending().await;
}
