//! Live heap per idle connection, by allocation size.
//!
//! Runs a service (in-process broker, two shards) and an axum server in this process, opens N
//! WebSocket connections to it over loopback, holds them idle, and reports how much heap the
//! server side holds per connection, broken down by allocation size. The client sockets are
//! turned into plain std sockets, so they hold no heap of their own.
//!
//! ```sh
//! cargo run --release -p heapprobe -- 2000
//! ```
//!
//! It counts what the Rust allocator hands out (over the system allocator), not RSS: RSS adds
//! the allocator's page-level overhead, which `loadtest connect` measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use axum_realtime_kit::bench_api::open_router;
use axum_realtime_kit::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Size classes of 8 bytes up to 32 KiB.
const CLASSES: usize = 4096;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_BY_CLASS: [AtomicI64; CLASSES] = [const { AtomicI64::new(0) }; CLASSES];

/// The system allocator, counting live bytes and live allocations per size class.
struct Counting;

// SAFETY: every call is forwarded unchanged to `System`; the counters are plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size(), 1);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        record(layout.size(), -1);
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn record(size: usize, sign: i64) {
    LIVE_BYTES.fetch_add(sign * size as i64, Relaxed);
    if let Some(class) = LIVE_BY_CLASS.get(size / 8) {
        class.fetch_add(sign, Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A handler that does nothing: the connections stay idle.
#[derive(Debug)]
struct Idle;

#[async_trait::async_trait]
impl MessageHandler for Idle {
    type ClientMessage = serde_json::Value;
    type ServerEvent = serde_json::Value;
    type AppState = ();
    type UserId = u32;

    async fn handle_direct_message(
        &self,
        _msg: &serde_json::Value,
        _ctx: &ConnectionContext<(), u32>,
    ) -> Result<Option<serde_json::Value>, HandlerError> {
        Ok(None)
    }

    async fn handle_broadcast_message(
        &self,
        _msg: serde_json::Value,
        _ctx: &ConnectionContext<(), u32>,
    ) -> Result<Option<serde_json::Value>, HandlerError> {
        Ok(None)
    }
}

fn by_class() -> Vec<i64> {
    LIVE_BY_CLASS.iter().map(|c| c.load(Relaxed)).collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let service = WebsocketService::builder(Idle, Arc::new(()))
        .shards(2)
        .metrics_interval(std::time::Duration::ZERO)
        .build();
    let router = open_router(service.clone(), 1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let (bytes_before, classes_before) = (LIVE_BYTES.load(Relaxed), by_class());
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let topic = ["general", "random"][i % 2];
        let req = format!(
            "GET /ws/{topic} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 256];
            let got = s.read(&mut chunk).await.unwrap();
            assert!(got > 0, "server closed during the handshake");
            head.extend_from_slice(&chunk[..got]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "upgrade refused");
        clients.push(s.into_std().unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (bytes_after, classes_after) = (LIVE_BYTES.load(Relaxed), by_class());
    assert_eq!(service.metrics().connections_active, n as u64);

    println!(
        "{n} idle connections: {:.0} B of live heap per connection",
        (bytes_after - bytes_before) as f64 / n as f64
    );
    println!("| allocation size (B) | per connection | bytes per connection |");
    println!("|---:|---:|---:|");
    for (class, (a, b)) in classes_before.iter().zip(&classes_after).enumerate() {
        let per_conn = (b - a) as f64 / n as f64;
        if per_conn >= 0.5 {
            let size = class * 8;
            println!(
                "| {size}–{} | {per_conn:.2} | {:.0} |",
                size + 7,
                per_conn * (size as f64 + 4.0)
            );
        }
    }
    // Everyone leaves: what the server still holds then was kept, not leaked per connection
    // (maps and slabs sized for the peak), and shows in idle RSS after a peak.
    drop(clients);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while service.metrics().connections_active > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let (bytes_gone, classes_gone) = (LIVE_BYTES.load(Relaxed), by_class());
    println!(
        "\nafter all {n} left ({} still open): {:.0} B of live heap per connection of the peak, kept",
        service.metrics().connections_active,
        (bytes_gone - bytes_before) as f64 / n as f64
    );
    println!("| allocation size (B) | allocations kept | bytes kept |");
    println!("|---:|---:|---:|");
    for (class, (a, b)) in classes_before.iter().zip(&classes_gone).enumerate() {
        let kept = b - a;
        if kept.abs() >= 4 {
            let size = class * 8;
            println!(
                "| {size}–{} | {kept} | {} |",
                size + 7,
                kept * (size as i64 + 4)
            );
        }
    }
}
