//! The `basic_chat` example as a process: it serves, and SIGTERM closes every client with 1001 and
//! exits 0.

mod support;

use std::process::Command;

use support::redis_server::start_redis;
use support::*;

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    let port = free_port();
    let mut server = spawn_example("basic_chat", port, &[]);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut alice = connect(addr, "general", ALICE).await;
    let mut bob = connect(addr, "random", BOB).await;
    alice.send_text(&send_message("general", "hi")).await;
    assert_eq!(alice.recv_json().await["NewMessage"]["username"], "alice");
    bob.assert_nothing_pending().await;

    let pid = server.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    for c in [&mut alice, &mut bob] {
        assert_eq!(c.expect_close().await, 1001);
        c.finish_close().await;
    }
    let status = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

async fn http_status(port: u16, path: &str) -> u16 {
    http_get(port, path).await.0
}

/// The status and body of `GET path`.
async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

/// The value of an unlabelled series in a Prometheus text exposition.
fn sample(exposition: &str, name: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (n, v) = line.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_serves_prometheus_metrics() {
    let port = free_port();
    let _server = spawn_example("basic_chat", port, &[]);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut alice = connect(addr, "general", ALICE).await;
    let mut bob = connect(addr, "general", BOB).await;
    alice.send_text(&send_message("general", "counted")).await;
    for c in [&mut alice, &mut bob] {
        assert_eq!(c.recv_json().await["NewMessage"]["text"], "counted");
    }

    // The counters are added after the frames went out (the publish is counted once the broker
    // has answered, which can be after the subscribers have the message), so a client can read
    // its frame before the message, the publish or the delivery is counted: wait until all of
    // them are, then check every value.
    let counted = tokio::time::timeout(WAIT, async {
        loop {
            let (status, body) = http_get(port, "/metrics").await;
            if status == 200
                && sample(&body, "rtk_messages_in_total") >= Some(1.0)
                && sample(&body, "rtk_publishes_total") >= Some(1.0)
                && sample(&body, "rtk_deliveries_total") >= Some(2.0)
                && sample(&body, "rtk_bytes_written_total") > Some(0.0)
            {
                return body;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let body = counted.expect("the publication's deliveries were never counted");
    assert_eq!(sample(&body, "rtk_connections"), Some(2.0), "{body}");
    assert_eq!(sample(&body, "rtk_subscriptions"), Some(2.0), "{body}");
    assert_eq!(sample(&body, "rtk_messages_in_total"), Some(1.0), "{body}");
    assert_eq!(sample(&body, "rtk_publishes_total"), Some(1.0), "{body}");
    assert_eq!(sample(&body, "rtk_deliveries_total"), Some(2.0), "{body}");
    assert!(
        sample(&body, "rtk_bytes_written_total").unwrap() > 0.0,
        "{body}"
    );
    assert_eq!(sample(&body, "rtk_broker_live"), Some(1.0), "{body}");
    assert!(
        body.contains("# TYPE rtk_deliveries_total counter"),
        "{body}"
    );

    // Gauges follow the connections down.
    drop((alice, bob));
    let gone = tokio::time::timeout(WAIT, async {
        loop {
            let (_, body) = http_get(port, "/metrics").await;
            if sample(&body, "rtk_connections") == Some(0.0)
                && sample(&body, "rtk_subscriptions") == Some(0.0)
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        gone.is_ok(),
        "connections and subscriptions never fell to 0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_rooms_through_redis() {
    let Some(redis) = start_redis("two_processes_share_rooms_through_redis") else {
        return;
    };
    let (pa, pb) = (free_port(), free_port());
    let _a = spawn_example("basic_chat", pa, &[("REDIS_URL", &redis.url())]);
    let _b = spawn_example("basic_chat", pb, &[("REDIS_URL", &redis.url())]);
    for port in [pa, pb] {
        let ok = tokio::time::timeout(WAIT, async {
            while http_status(port, "/ready").await != 200 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(ok.is_ok(), "instance on {port} never became ready");
    }
    let mut alice = connect(format!("127.0.0.1:{pa}").parse().unwrap(), "general", ALICE).await;
    let mut bob = connect(format!("127.0.0.1:{pb}").parse().unwrap(), "general", BOB).await;
    bob.send_text(&send_message("general", "from b")).await;
    for c in [&mut alice, &mut bob] {
        let m = c.recv_json().await;
        assert_eq!(m["NewMessage"]["username"], "bob");
        assert_eq!(m["NewMessage"]["text"], "from b");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_reachable_redis_health_is_ok_and_ready_is_503() {
    // Nothing listens on this port.
    let dead = format!("redis://127.0.0.1:{}/", free_port());
    let port = free_port();
    let _server = spawn_example("basic_chat", port, &[("REDIS_URL", &dead)]);
    assert_eq!(http_status(port, "/health").await, 200);
    assert_eq!(http_status(port, "/ready").await, 503);
    // A chat message cannot be broadcast: the sender is told, and the connection stays open.
    let mut alice = connect(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "general",
        ALICE,
    )
    .await;
    alice.send_text(&send_message("general", "anyone?")).await;
    let err = alice.recv_json().await;
    assert_eq!(err["type"], "error", "{err}");
    alice.assert_nothing_pending().await;
}
