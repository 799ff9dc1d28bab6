//! The `basic_chat` example's `POST /broadcast/{topic}`: authorized like `/ws/{topic}`, and the
//! JSON body reaches every subscriber of the topic verbatim. The example runs as a process.

mod support;

use support::*;

/// Expects the next text frame to be exactly `payload`.
async fn expect_text(client: &mut Client, payload: &[u8]) {
    loop {
        let f = client.recv_frame().await.expect("stream ended");
        match f.opcode {
            0x9 | 0xA => continue,
            0x1 => {
                assert_eq!(
                    String::from_utf8_lossy(&f.payload),
                    String::from_utf8_lossy(payload)
                );
                assert!(f.fin);
                return;
            }
            op => panic!("expected text, got opcode {op:#x}"),
        }
    }
}

#[tokio::test]
async fn a_posted_body_reaches_every_subscriber_of_the_topic_verbatim() {
    let server = basic_chat(2, None);
    let mut alice = connect(server.addr, "general", ALICE).await;
    let mut bob = connect(server.addr, "general", BOB).await;
    let mut elsewhere = connect(server.addr, "random", BOB).await;

    // Whitespace and non-ASCII text survive: the body is published as sent.
    let body = " {\"alert\" : \"déploiement à 17h\", \"n\": [1, 2]}\n".as_bytes();
    let (status, _) = post(
        server.addr,
        &format!("/broadcast/general?token={ALICE}"),
        &[],
        body,
    )
    .await;
    assert_eq!(status, 202);
    expect_text(&mut alice, body).await;
    expect_text(&mut bob, body).await;
    elsewhere.assert_nothing_pending().await;

    // The token may also come as a bearer header, as for the WebSocket route.
    let bearer = format!("Bearer {BOB}");
    let (status, _) = post(
        server.addr,
        "/broadcast/general",
        &[("Authorization", &bearer)],
        b"\"hi\"",
    )
    .await;
    assert_eq!(status, 202);
    expect_text(&mut alice, b"\"hi\"").await;
    expect_text(&mut bob, b"\"hi\"").await;

    // A chat-shaped body is indistinguishable from a chat message.
    let chat = br#"{"NewMessage":{"room":"general","username":"ops","text":"maintenance"}}"#;
    let (status, _) = post(
        server.addr,
        &format!("/broadcast/general?token={BOB}"),
        &[],
        chat,
    )
    .await;
    assert_eq!(status, 202);
    let m = alice.recv_json().await;
    assert_eq!(m["NewMessage"]["username"], "ops");
    bob.recv_json().await;

    // One's own private topic is allowed, and reaches only its subscriber.
    let mut private = connect(server.addr, &format!("private-user-{ALICE_ID}"), ALICE).await;
    let (status, _) = post(
        server.addr,
        &format!("/broadcast/private-user-{ALICE_ID}?token={ALICE}"),
        &[],
        b"{\"dm\":true}",
    )
    .await;
    assert_eq!(status, 202);
    expect_text(&mut private, b"{\"dm\":true}").await;
    for c in [&mut alice, &mut bob, &mut elsewhere] {
        c.assert_nothing_pending().await;
    }
}

#[tokio::test]
async fn the_token_and_topic_are_checked_like_the_websocket_route() {
    let server = basic_chat(1, None);
    let mut alice = connect(server.addr, "general", ALICE).await;
    let addr = server.addr;
    // (path, Authorization header, expected status)
    let cases: [(String, Option<&str>, u16); 7] = [
        ("/broadcast/general".into(), None, 401),
        ("/broadcast/general?token=".into(), None, 401),
        ("/broadcast/general?token=nope".into(), None, 401),
        (
            "/broadcast/general?token=not-a-uuid:alice".into(),
            None,
            401,
        ),
        ("/broadcast/general".into(), Some("Bearer nope"), 401),
        // Bob may not post to Alice's private topic.
        (
            format!("/broadcast/private-user-{ALICE_ID}?token={BOB}"),
            None,
            403,
        ),
        (format!("/broadcast/lobby?token={ALICE}"), None, 404),
    ];
    for (path, auth, expected) in cases {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let (status, _) = post(addr, &path, &headers, b"{\"x\":1}").await;
        assert_eq!(status, expected, "POST {path}");
    }
    // Without a valid token the body is not even looked at.
    let (status, _) = post(addr, "/broadcast/general", &[], b"not json").await;
    assert_eq!(status, 401);
    alice.assert_nothing_pending().await;
}

#[tokio::test]
async fn a_body_that_is_not_utf8_json_is_400_and_not_published() {
    let server = basic_chat(1, None);
    let mut alice = connect(server.addr, "general", ALICE).await;
    let path = format!("/broadcast/general?token={ALICE}");
    for body in [
        &b""[..],
        b"hello",
        b"{\"a\":",
        b"{} {}",
        b"\"\xff\xfe\"",
        b"{\"a\":\"\xc3\x28\"}",
    ] {
        let (status, text) = post(server.addr, &path, &[], body).await;
        assert_eq!(status, 400, "body {body:?}");
        assert!(text.contains("JSON"), "{text}");
    }
    alice.assert_nothing_pending().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_is_503_with_the_reason() {
    // Nothing listens on this port: every publish fails.
    let dead = format!("redis://127.0.0.1:{}/", free_port());
    let server = basic_chat(1, Some(&dead));
    let addr = server.addr;

    let (status, text) = post(
        addr,
        &format!("/broadcast/general?token={ALICE}"),
        &[],
        b"{}",
    )
    .await;
    assert_eq!(status, 503);
    assert!(text.contains("could not publish"), "{text}");
}
