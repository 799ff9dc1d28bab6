//! `on_connect` runs once after the subscription is in place; `on_disconnect` exactly once, however
//! the connection ends; shutdown closes everyone with 1001.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use axum_realtime_kit::bench_api::open_router;
use axum_realtime_kit::prelude::*;
use support::{WAIT, try_connect};

#[derive(Debug, Default)]
struct Counts {
    connects: AtomicUsize,
    disconnects: AtomicUsize,
}

#[derive(Debug)]
struct Hooks;

#[async_trait]
impl MessageHandler for Hooks {
    type ClientMessage = serde_json::Value;
    type ServerEvent = serde_json::Value;
    type AppState = Counts;
    type UserId = u32;

    async fn on_connect(&self, ctx: &ConnectionContext<Counts, u32>) {
        ctx.app_state.connects.fetch_add(1, Ordering::SeqCst);
        // The subscription is already in place: a message sent now reaches this client.
        ctx.sink.send_text("welcome").unwrap();
    }

    async fn handle_broadcast_message(
        &self,
        msg: serde_json::Value,
        _ctx: &ConnectionContext<Counts, u32>,
    ) -> Result<Option<serde_json::Value>, HandlerError> {
        if msg == "panic" {
            panic!("handler bug");
        }
        Ok(Some(msg))
    }

    async fn on_disconnect(&self, ctx: &ConnectionContext<Counts, u32>) {
        ctx.app_state.disconnects.fetch_add(1, Ordering::SeqCst);
    }
}

async fn hooks_server(shards: usize) -> (std::net::SocketAddr, Arc<WebsocketService<Hooks>>) {
    let service = WebsocketService::builder(Hooks, Arc::new(Counts::default()))
        .shards(shards)
        .build();
    let addr = support::serve(open_router(service.clone(), 7)).await;
    (addr, service)
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("condition not reached");
}

#[tokio::test]
async fn hooks_run_exactly_once_however_the_connection_ends() {
    for shards in [1, 4] {
        let (addr, service) = hooks_server(shards).await;
        let counts = service.app_state().clone();
        for round in 0..20 {
            let (status, client) = try_connect(addr, "/ws/t", &[]).await;
            assert_eq!(status, 101);
            let mut c = client.unwrap();
            let f = c.recv_frame().await.unwrap();
            assert_eq!(f.payload, b"welcome");
            match round % 4 {
                0 => c.abort(),
                1 => {
                    c.send_frame(true, 0x8, &1000u16.to_be_bytes(), true).await;
                    c.expect_close().await;
                }
                2 => {
                    c.send_raw(&support::encode_client_frame(true, 0x1, b"{}", false))
                        .await;
                    assert_eq!(c.expect_close().await, 1002);
                    c.abort();
                }
                _ => {
                    c.send_text("\"panic\"").await;
                    assert_eq!(c.expect_close().await, 1011);
                    c.abort();
                }
            }
            let target = round + 1;
            wait_for(|| counts.disconnects.load(Ordering::SeqCst) == target).await;
        }
        assert_eq!(counts.connects.load(Ordering::SeqCst), 20);
        wait_for(|| service.metrics().connections_active == 0).await;
        assert_eq!(counts.disconnects.load(Ordering::SeqCst), 20);
    }
}

#[tokio::test]
async fn shutdown_closes_everyone_with_1001_and_runs_on_disconnect() {
    let (addr, service) = hooks_server(2).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let (_, c) = try_connect(addr, "/ws/t", &[]).await;
        let mut c = c.unwrap();
        c.recv_frame().await.unwrap();
        clients.push(c);
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let code = c.expect_close().await;
                c.finish_close().await;
                code
            })
        })
        .collect();
    tokio::time::timeout(WAIT, service.shutdown())
        .await
        .unwrap();
    for r in readers {
        assert_eq!(r.await.unwrap(), 1001);
    }
    assert_eq!(service.app_state().disconnects.load(Ordering::SeqCst), 10);
    assert_eq!(service.metrics().connections_active, 0);
    // New upgrades are refused while shut down.
    assert_eq!(try_connect(addr, "/ws/t", &[]).await.0, 503);
}
