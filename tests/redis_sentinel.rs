//! Sentinel: instances find the primary through the sentinels and follow a failover without any
//! WebSocket client reconnecting. The test starts its own primary, replica and sentinel.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use support::redis_server::{
    Listen, RedisServer, SentinelServer, start_redis, start_redis_with, start_sentinel,
};
use support::*;

/// Publishes per second while the primary is killed.
const RATE: u64 = 500;
/// Messages delivered after the failover that show delivery resumed.
const AFTER: u64 = 200;
/// Longest a failover may take here before the test fails: Sentinel's down-after (1 s), its
/// election and the promotion, then the instances' reconnects.
const FAILOVER_WAIT: Duration = Duration::from_secs(30);

/// A primary, a replica of it, and a sentinel watching them as service `chat`; `None` when the
/// servers are not installed (the test is then skipped, see `start_redis`).
fn watched_primary(test: &str) -> Option<(RedisServer, RedisServer, SentinelServer)> {
    let primary = start_redis(test)?;
    let replica = start_redis_with(
        test,
        Listen::Tcp(vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.port.to_string(),
        ]),
    )?;
    let sentinel = start_sentinel(test, primary.port, "chat")?;
    Some((primary, replica, sentinel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_fails_over_and_delivery_resumes_without_client_reconnects() {
    const TEST: &str = "a_killed_primary_fails_over";
    let Some((mut primary, _replica, sentinel)) = watched_primary(TEST) else {
        return;
    };
    // The first sentinel listed is not there: the instances ask the next one.
    let url = format!(
        "redis+sentinel://127.0.0.1:{},127.0.0.1:{}/chat",
        free_port(),
        sentinel.port
    );
    let a = chat_server_with(Some(url.clone()), 1).await;
    let b = chat_server_with(Some(url), 1).await;
    let mut on_a = connect(a.addr, "general", ALICE).await;
    let mut on_b = connect(b.addr, "general", BOB).await;

    // A watches its readiness; B publishes RATE messages per second, numbered.
    let saw_unready = Arc::new(AtomicBool::new(false));
    let watching = {
        let (service, saw) = (a.service.clone(), saw_unready.clone());
        tokio::spawn(async move {
            loop {
                if !service.is_ready() {
                    saw.store(true, Ordering::Release);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let next = Arc::new(AtomicU64::new(0));
    let publishing = {
        let (service, next) = (b.service.clone(), next.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            loop {
                tick.tick().await;
                let n = next.fetch_add(1, Ordering::AcqRel);
                // Publishes fail while there is no primary: those numbers are never delivered.
                let _ = service
                    .publish_raw("general", format!("{{\"n\":{n}}}"))
                    .await;
            }
        })
    };

    // Delivery flows, the primary is killed, and it flows again: every client sees numbers
    // that only increase (no duplicate, no reordering), on the connection it opened.
    let mut last = [None::<u64>, None];
    let mut recv = async |i: usize, client: &mut Client| -> u64 {
        let n = client.recv_json().await["n"].as_u64().unwrap();
        if let Some(prev) = last[i] {
            assert!(n > prev, "client {i}: {n} after {prev}");
        }
        last[i] = Some(n);
        n
    };
    for _ in 0..100 {
        recv(0, &mut on_a).await;
        recv(1, &mut on_b).await;
    }
    primary.kill();
    let killed_at = next.load(Ordering::Acquire);
    let resumed = tokio::time::timeout(FAILOVER_WAIT, async {
        for (i, client) in [&mut on_a, &mut on_b].into_iter().enumerate() {
            while recv(i, client).await < killed_at + AFTER {}
        }
    })
    .await;
    assert!(
        resumed.is_ok(),
        "delivery did not resume after the failover"
    );
    publishing.abort();
    watching.abort();
    assert!(
        saw_unready.load(Ordering::Acquire),
        "readiness never showed the outage"
    );
    for server in [&a, &b] {
        let service = server.service.clone();
        wait_until("ready again", move || service.is_ready()).await;
    }
    assert!(a.service.metrics().broker_reconnects >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_keeps_the_old_primary_running_is_followed() {
    const TEST: &str = "a_failover_that_keeps_the_old_primary_running_is_followed";
    let Some((primary, _replica, sentinel)) = watched_primary(TEST) else {
        return;
    };
    let url = format!("redis+sentinel://127.0.0.1:{}/chat", sentinel.port);
    let a = chat_server_with(Some(url.clone()), 1).await;
    let b = chat_server_with(Some(url), 1).await;
    let mut on_a = connect(a.addr, "general", ALICE).await;
    // The sentinel must know the replica before it can promote it.
    let sentinel_client = redis::Client::open(format!("redis://127.0.0.1:{}/", sentinel.port))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ok = tokio::time::timeout(FAILOVER_WAIT, async {
        loop {
            let mut c = sentinel_client.clone();
            let res: redis::RedisResult<String> = redis::cmd("SENTINEL")
                .arg("FAILOVER")
                .arg("chat")
                .query_async(&mut c)
                .await;
            if res.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "the sentinel never accepted the failover");
    // The old primary keeps running as a replica: a publish that went there would reach no
    // one on the new primary. Once both instances follow, B's publishes reach A's client.
    let delivered = tokio::time::timeout(FAILOVER_WAIT, async {
        let mut n = 0u64;
        loop {
            n += 1;
            let _ = b
                .service
                .publish_raw("general", format!("{{\"n\":{n}}}"))
                .await;
            if let Ok(Some(frame)) =
                tokio::time::timeout(Duration::from_millis(200), on_a.recv_frame()).await
            {
                let got: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
                if got["n"] == n {
                    let primary_now = sentinel_primary_port(&sentinel_client).await;
                    if primary_now != primary.port {
                        return;
                    }
                }
            }
        }
    })
    .await;
    assert!(delivered.is_ok(), "instances did not follow the failover");
}

async fn sentinel_primary_port(client: &redis::aio::MultiplexedConnection) -> u16 {
    let mut c = client.clone();
    let (_, port): (String, u16) = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg("chat")
        .query_async(&mut c)
        .await
        .unwrap();
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_sentinel_service_keeps_the_instance_unready() {
    const TEST: &str = "an_unknown_sentinel_service_keeps_the_instance_unready";
    let Some(primary) = start_redis(TEST) else {
        return;
    };
    let Some(sentinel) = start_sentinel(TEST, primary.port, "chat") else {
        return;
    };
    let service = chat::builder()
        .redis_url(Some(format!(
            "redis+sentinel://127.0.0.1:{}/no-such-service",
            sentinel.port
        )))
        .build();
    assert_stays_unready(&service).await;
}
