//! A burst larger than the outbound bound reaches a client that reads; a client that does not
//! read is still closed, and what it holds stays under the ceiling.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::*;

/// Messages per burst: 100 × 16 KB ≈ 1.6 MB, more than the default 1 MiB bound.
const BURST: usize = 100;
const BURSTS: usize = 5;

fn payload(i: usize) -> String {
    format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(16 * 1024))
}

/// A client on `general` that reads continuously, checking sequence numbers; `progress` counts
/// what it received. Ends after `total` messages.
fn reader(
    mut c: Client,
    total: usize,
    progress: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Client> {
    tokio::spawn(async move {
        for i in 0..total {
            assert_eq!(c.recv_json().await["n"], i, "lost or reordered");
            progress.store(i + 1, Ordering::Release);
        }
        c
    })
}

/// Publishes burst `b` in one go, then waits (bounded) until the reader has all of it.
async fn burst(server: &Server, b: usize, progress: &AtomicUsize) {
    for i in b * BURST..(b + 1) * BURST {
        server
            .service
            .publish_raw("general", payload(i))
            .await
            .unwrap();
    }
    let want = (b + 1) * BURST;
    wait_until("the reader received the burst", || {
        progress.load(Ordering::Acquire) >= want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_receives_bursts_larger_than_the_bound() {
    let server = serve_chat(chat::builder().build()).await;
    let mut c = connect(server.addr, "general", BOB).await;
    c.assert_nothing_pending().await;
    let progress = Arc::new(AtomicUsize::new(0));
    let reading = reader(c, BURST * BURSTS, progress.clone());
    for b in 0..BURSTS {
        burst(&server, b, &progress).await;
    }
    let mut c = reading.await.unwrap();
    c.assert_nothing_pending().await;
    assert_eq!(server.service.metrics().slow_consumer_closes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_and_holds_at_most_the_ceiling() {
    let bound = 1024 * 1024;
    let ceiling = 4 * bound;
    let server = serve_chat(chat::builder().outbound_queue_bytes(bound).build()).await;
    let mut stalled = connect(server.addr, "general", ALICE).await;
    let c = connect(server.addr, "general", BOB).await;
    let progress = Arc::new(AtomicUsize::new(0));
    let reading = reader(c, usize::MAX, progress.clone());
    // Bursts, each read in full by the reader, until the stalled client is closed; then one
    // more pause past the grace, in case it was closed by the writer rather than a push.
    let mut b = 0;
    while server.service.metrics().slow_consumer_closes == 0 {
        assert!(b < 60, "the stalled client was never closed");
        burst(&server, b, &progress).await;
        b += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = b * BURST;
    // The reader got every message, in order, and was not closed.
    assert_eq!(progress.load(Ordering::Acquire), total);
    assert!(!reading.is_finished(), "the reader failed");
    reading.abort();
    assert_eq!(server.service.metrics().slow_consumer_closes, 1);
    // What the kernel buffered arrives, then the close.
    assert_eq!(stalled.expect_close().await, 1008);
    // Once it has ended: it went over the bound, never over the ceiling.
    let service = server.service.clone();
    wait_until("the stalled connection ended", move || {
        service.metrics().connections_active == 1
    })
    .await;
    let peak = server.service.metrics().outbound_queue_peak_bytes;
    assert!(peak > bound as u64, "peak {peak}");
    assert!(peak <= ceiling as u64, "peak {peak} over the ceiling");
}
