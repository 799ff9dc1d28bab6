//! Broadcasts reach every subscriber of the topic and nobody else; direct replies and errors
//! reach the sender alone. Each test runs with 1 and with 4 shards.

mod support;

use serde_json::{Value, json};
use support::*;

fn new_message(room: &str, user: &str, text: &str) -> Value {
    json!({"NewMessage": {"room": room, "username": user, "text": text}})
}

#[tokio::test]
async fn broadcast_reaches_every_subscriber_of_the_topic_only() {
    for shards in [1, 4] {
        let server = chat_server(shards).await;
        let mut alice = connect(server.addr, "general", ALICE).await;
        let mut bob = connect(server.addr, "general", BOB).await;
        let mut carol = connect(server.addr, "general", BOB).await;
        let mut other = connect(server.addr, "random", ALICE).await;

        bob.send_text(&send_message("general", "hello")).await;
        let expected = new_message("general", "bob", "hello");
        for c in [&mut alice, &mut bob, &mut carol] {
            assert_eq!(c.recv_json().await, expected, "shards={shards}");
        }
        // `random` got nothing: its next text is the answer to its own ping.
        other.assert_nothing_pending().await;
        for c in [&mut alice, &mut bob, &mut carol] {
            c.assert_nothing_pending().await;
        }
    }
}

#[tokio::test]
async fn ping_is_answered_to_the_sender_alone() {
    for shards in [1, 4] {
        let server = chat_server(shards).await;
        let mut alice = connect(server.addr, "general", ALICE).await;
        let mut bob = connect(server.addr, "general", BOB).await;
        alice.send_text("\"Ping\"").await;
        assert_eq!(alice.recv_json().await, json!("Pong"));
        // Bob's next message is his own broadcast, not Alice's pong.
        bob.send_text(&send_message("general", "x")).await;
        assert_eq!(bob.recv_json().await, new_message("general", "bob", "x"));
        assert_eq!(alice.recv_json().await, new_message("general", "bob", "x"));
    }
}

#[tokio::test]
async fn errors_go_to_the_sender_and_the_connection_stays_open() {
    for shards in [1, 4] {
        let server = chat_server(shards).await;
        let mut alice = connect(server.addr, "general", ALICE).await;
        let mut bob = connect(server.addr, "general", BOB).await;

        for bad in [
            "not json",
            "{\"SendMessage\":{\"room\":\"general\"}}",
            "{\"Nope\":1}",
            "",
            "[1,2",
        ] {
            alice.send_text(bad).await;
            let err = alice.recv_json().await;
            assert_eq!(err["type"], "error", "{bad:?} → {err}");
            assert!(
                err["message"]
                    .as_str()
                    .unwrap()
                    .contains("Invalid message format")
            );
        }
        alice.send_text(&send_message("random", "wrong room")).await;
        let err = alice.recv_json().await;
        assert_eq!(err["type"], "error");
        assert!(err["message"].as_str().unwrap().contains("random"), "{err}");

        alice.send_frame(true, 0x2, b"\x00\x01", true).await;
        assert_eq!(alice.recv_json().await["type"], "error");

        // Bob saw none of it; Alice can still chat.
        alice
            .send_text(&send_message("general", "still here"))
            .await;
        assert_eq!(
            bob.recv_json().await,
            new_message("general", "alice", "still here")
        );
        assert_eq!(
            alice.recv_json().await,
            new_message("general", "alice", "still here")
        );
    }
}

#[tokio::test]
async fn fragmented_messages_are_reassembled() {
    let server = chat_server(2).await;
    let mut alice = connect(server.addr, "general", ALICE).await;
    let msg = send_message("general", &"ü".repeat(300));
    let bytes = msg.as_bytes();
    // Split inside a multi-byte character, with a ping between fragments.
    let (a, rest) = bytes.split_at(45);
    let (b, c) = rest.split_at(200);
    alice.send_frame(false, 0x1, a, true).await;
    alice.send_frame(true, 0x9, b"mid", true).await;
    alice.send_frame(false, 0x0, b, true).await;
    alice.send_frame(true, 0x0, c, true).await;
    let pong = alice.recv_frame().await.unwrap();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (0xA, &b"mid"[..]));
    assert_eq!(
        alice.recv_json().await,
        new_message("general", "alice", &"ü".repeat(300))
    );
}

#[tokio::test]
async fn ten_thousand_messages_arrive_in_order_at_three_subscribers() {
    const N: usize = 10_000;
    for shards in [1, 4] {
        let server = chat_server(shards).await;
        let mut readers = Vec::new();
        for _ in 0..3 {
            let mut c = connect(server.addr, "general", BOB).await;
            c.assert_nothing_pending().await;
            readers.push(tokio::spawn(async move {
                for i in 0..N {
                    let m = c.recv_json().await;
                    assert_eq!(m["NewMessage"]["text"], i.to_string(), "message {i}");
                }
            }));
        }
        let sender = connect(server.addr, "general", ALICE).await;
        let sender_reads = tokio::spawn(async move {
            let mut c = sender;
            let mut out = Vec::with_capacity(N * 80);
            for i in 0..N {
                out.extend(encode_client_frame(
                    true,
                    0x1,
                    send_message("general", &i.to_string()).as_bytes(),
                    true,
                ));
            }
            c.send_raw(&out).await;
            for i in 0..N {
                assert_eq!(c.recv_json().await["NewMessage"]["text"], i.to_string());
            }
        });
        sender_reads.await.unwrap();
        for r in readers {
            r.await.unwrap();
        }
        let m = server.service.metrics();
        assert_eq!(m.publishes, N as u64);
        assert_eq!(m.slow_consumer_closes, 0);
    }
}
