//! A client of positioned topics speaking `rtk1`: opening a topic (recovering from a position),
//! reading its `subscribed` and its `pub` frames with their offsets and epochs, and following a
//! topic the way the protocol asks a client to, for tests that count publications by the `n`
//! inside each payload.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::{ALICE, Client, try_connect};

/// Opens `topic` speaking `rtk1`, recovering from `since` (epoch, offset) if given.
pub async fn rtk1(addr: SocketAddr, topic: &str, since: Option<(&str, u64)>) -> Client {
    let mut path = format!("/ws/{topic}?token={ALICE}&proto=rtk1");
    if let Some((epoch, offset)) = since {
        path.push_str(&format!("&since={offset}&epoch={epoch}"));
    }
    let (status, client) = try_connect(addr, &path, &[]).await;
    assert_eq!(status, 101, "upgrade to {path} refused");
    client.unwrap()
}

/// [`rtk1`], then [`subscribed`]: the client and its `subscribed` message.
pub async fn rtk1_subscribed(
    addr: SocketAddr,
    topic: &str,
    since: Option<(&str, u64)>,
) -> (Client, Value) {
    let mut c = rtk1(addr, topic, since).await;
    let m = subscribed(&mut c, topic).await;
    (c, m)
}

/// The next message, which must be `subscribed` for `topic`.
pub async fn subscribed(c: &mut Client, topic: &str) -> Value {
    let m = c.recv_json().await;
    assert_eq!(m["type"], "subscribed", "{m}");
    assert_eq!(m["topic"], topic, "{m}");
    m
}

/// The next message, which must be a `pub` of `topic`: its offset, epoch and payload's `n`.
pub async fn next_pub(c: &mut Client, topic: &str) -> (u64, String, u64) {
    let m = c.recv_json().await;
    assert_eq!(m["type"], "pub", "{m}");
    assert_eq!(m["topic"], topic, "{m}");
    (
        m["o"].as_u64().expect("an offset"),
        m["e"].as_str().expect("an epoch").to_owned(),
        m["d"]["n"].as_u64().expect("payload with n"),
    )
}

/// What a client [`follow`]ing a topic received.
#[derive(Default)]
pub struct Received {
    /// Each publication's `n`, in arrival order.
    pub ns: Vec<u64>,
    /// A subscribe came back `recovered: false`: the application reloads its state.
    pub refused: bool,
}

/// Follows `topic` on `c`, already subscribed, as `rtk1` asks a client to: records each
/// publication's `n` in `seen`, and answers `insufficient_state` by subscribing again from its
/// last position, until `stop`. A connection that ends fails the task: no client may reconnect.
pub fn follow(
    mut c: Client,
    topic: &'static str,
    seen: Arc<Mutex<Received>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut position = None::<(u64, Value)>;
        while !stop.load(Ordering::Acquire) {
            let Ok(m) = tokio::time::timeout(Duration::from_millis(100), c.recv_json()).await
            else {
                continue;
            };
            match m["type"].as_str() {
                Some("pub") => {
                    seen.lock().unwrap().ns.push(m["d"]["n"].as_u64().unwrap());
                    position = Some((m["o"].as_u64().unwrap(), m["e"].clone()));
                }
                Some("insufficient_state") => {
                    let mut sub = json!({"type": "subscribe", "topic": topic});
                    if let Some((o, e)) = &position {
                        sub["since"] = json!({"o": o, "e": e});
                    }
                    c.send_text(&sub.to_string()).await;
                }
                Some("subscribed") => {
                    if m["recovered"] == false {
                        seen.lock().unwrap().refused = true;
                    }
                }
                _ => panic!("unexpected frame {m}"),
            }
        }
    })
}
