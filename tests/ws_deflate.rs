//! permessage-deflate (RFC 7692) over real sockets: what is negotiated, that publications reach
//! compressing and plain subscribers intact (one compressed frame for all), that small payloads
//! stay plain, and that compressed client messages are inflated within the size limit.

mod support;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{Value, json};
use support::{Client, Frame, Server, chat, serve_chat, try_connect_head};

const OFFER: &str = "permessage-deflate; client_max_window_bits";
const AGREED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

async fn server(deflate: bool) -> Server {
    serve_chat(chat::builder().permessage_deflate(deflate).build()).await
}

/// Upgrades to `topic` with `extensions` offered; the client and the extension agreed (the
/// `Sec-WebSocket-Extensions` response header), if any.
async fn connect(
    server: &Server,
    topic: &str,
    extensions: Option<&str>,
) -> (Client, Option<String>) {
    let headers: Vec<(&str, &str)> = extensions
        .map(|e| ("Sec-WebSocket-Extensions", e))
        .into_iter()
        .collect();
    let path = format!("/ws/{topic}?token=1:alice");
    let (status, head, client) = try_connect_head(server.addr, &path, &headers).await;
    assert_eq!(status, 101, "{head}");
    let agreed = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| value.trim().to_owned())
    });
    (client.unwrap(), agreed)
}

/// Compresses `data` as a permessage-deflate client does: raw deflate, sync flush, the trailing
/// `00 00 ff ff` removed.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    while (c.total_in() as usize) < data.len() || out.len() == out.capacity() {
        if out.len() == out.capacity() {
            out.reserve(out.capacity());
        }
        let taken = c.total_in() as usize;
        c.compress_vec(&data[taken..], &mut out, FlushCompress::Sync)
            .unwrap();
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut d = Decompress::new(false);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    assert_eq!(d.total_in() as usize, input.len(), "inflated in one call");
    out
}

/// The next data frame (pings skipped).
async fn next_data(client: &mut Client) -> Frame {
    loop {
        let f = client.recv_frame().await.expect("stream ended");
        if f.opcode & 0x8 == 0 {
            return f;
        }
    }
}

/// A realistic dashboard update of about `len` bytes.
fn dashboard(seq: usize, len: usize) -> Vec<u8> {
    let mut rows = Vec::new();
    let mut i = 0;
    while serde_json::to_vec(&rows).unwrap().len() < len {
        rows.push(json!({"id": i, "symbol": format!("SYM{}", i % 9), "price": 100.0 + (i * 37 % 500) as f64 / 10.0, "change": -0.25 + (i % 5) as f64 / 10.0}));
        i += 1;
    }
    serde_json::to_vec(&json!({"seq": seq, "rows": rows})).unwrap()
}

#[tokio::test]
async fn negotiation_follows_the_offer() {
    let on = server(true).await;
    // No offer: plain.
    assert_eq!(connect(&on, "t", None).await.1, None);
    // A browser's offer: accepted, both sides without context takeover.
    assert_eq!(
        connect(&on, "t", Some(OFFER)).await.1.as_deref(),
        Some(AGREED)
    );
    // A window limit for our messages is honoured and answered.
    let offer = "permessage-deflate; server_max_window_bits=10";
    let agreed = format!("{AGREED}; server_max_window_bits=10");
    assert_eq!(connect(&on, "t", Some(offer)).await.1, Some(agreed));
    // Parameters we cannot honour: declined, plain frames; a later acceptable offer is taken.
    for bad in [
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; mystery_parameter",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
    ] {
        assert_eq!(connect(&on, "t", Some(bad)).await.1, None, "{bad}");
        let two = format!("{bad}, permessage-deflate");
        assert_eq!(
            connect(&on, "t", Some(&two)).await.1.as_deref(),
            Some(AGREED)
        );
    }
    // Off (the default): never agreed.
    let off = server(false).await;
    assert_eq!(connect(&off, "t", Some(OFFER)).await.1, None);
}

#[tokio::test]
async fn a_publication_reaches_compressing_and_plain_subscribers() {
    let s = server(true).await;
    let mut compressing = Vec::new();
    for _ in 0..3 {
        compressing.push(connect(&s, "dash", Some(OFFER)).await.0);
    }
    let (mut plain, _) = connect(&s, "dash", None).await;
    let (mut narrow, _) = connect(
        &s,
        "dash",
        Some("permessage-deflate; server_max_window_bits=9"),
    )
    .await;
    for seq in 0..3 {
        let payload = dashboard(seq, 1024);
        s.service
            .publish_raw("dash", bytes::Bytes::from(payload.clone()))
            .await
            .unwrap();
        let mut wire = Vec::new();
        for client in &mut compressing {
            let f = next_data(client).await;
            assert!(f.rsv1 && f.fin && f.opcode == 0x1, "compressed text");
            assert!(
                f.payload.len() < payload.len() / 2,
                "{} bytes",
                f.payload.len()
            );
            assert_eq!(inflate(&f.payload), payload, "message {seq}");
            wire.push(f.payload);
        }
        assert!(
            wire.windows(2).all(|w| w[0] == w[1]),
            "one compressed frame for all"
        );
        let f = next_data(&mut plain).await;
        assert!(!f.rsv1);
        assert_eq!(f.payload, payload);
        // A 512-byte window gets the message compressed in pieces that fit it.
        let f = next_data(&mut narrow).await;
        assert!(f.rsv1);
        assert_eq!(inflate(&f.payload), payload);
    }
    // Under the threshold: plain for everyone.
    let small = br#"{"seq":9,"price":101.5}"#;
    s.service
        .publish_raw("dash", bytes::Bytes::from_static(small))
        .await
        .unwrap();
    for client in compressing.iter_mut().chain([&mut narrow]) {
        let f = next_data(client).await;
        assert!(!f.rsv1);
        assert_eq!(f.payload, small);
    }
}

#[tokio::test]
async fn compressed_client_messages_are_handled_and_replies_compressed() {
    let s = server(true).await;
    let (mut alice, _) = connect(&s, "room", Some(OFFER)).await;
    let (mut bob, _) = connect(&s, "room", None).await;
    let text = "the deploy went fine; dashboards are green in every region. ".repeat(8);
    let msg = json!({"SendMessage": {"room": "room", "text": text}}).to_string();
    // In one frame, then in three fragments (RSV1 on the first only).
    let compressed = deflate(msg.as_bytes());
    alice.send_frame(true, 0x41, &compressed, true).await;
    let third = compressed.len() / 3;
    alice
        .send_frame(false, 0x41, &compressed[..third], true)
        .await;
    alice
        .send_frame(false, 0x0, &compressed[third..2 * third], true)
        .await;
    alice
        .send_frame(true, 0x0, &compressed[2 * third..], true)
        .await;
    let expected = json!({"NewMessage": {"room": "room", "username": "alice", "text": text}});
    for _ in 0..2 {
        let f = next_data(&mut alice).await;
        assert!(f.rsv1, "the broadcast is compressed for alice");
        assert_eq!(
            serde_json::from_slice::<Value>(&inflate(&f.payload)).unwrap(),
            expected
        );
        assert_eq!(bob.recv_json().await, expected);
    }
    // A compressed "Ping" gets its (short, so plain) reply.
    alice
        .send_frame(true, 0x41, &deflate(b"\"Ping\""), true)
        .await;
    let f = next_data(&mut alice).await;
    assert!(!f.rsv1);
    assert_eq!(f.payload, b"\"Pong\"");
    // An error reply long enough to compress is compressed for this connection alone.
    let room = "x".repeat(300);
    let wrong = json!({"SendMessage": {"room": room, "text": "hi"}}).to_string();
    alice.send_text(&wrong).await;
    let f = next_data(&mut alice).await;
    assert!(f.rsv1, "a direct reply over the threshold is compressed");
    let reply: Value = serde_json::from_slice(&inflate(&f.payload)).unwrap();
    assert_eq!(reply["type"], "error");
    bob.send_text(&wrong).await;
    let f = next_data(&mut bob).await;
    assert!(!f.rsv1);
}

#[tokio::test]
async fn a_decompression_bomb_is_closed_1009() {
    let s = serve_chat(
        chat::builder()
            .permessage_deflate(true)
            .max_message_size(64 * 1024)
            .build(),
    )
    .await;
    let (mut client, _) = connect(&s, "room", Some(OFFER)).await;
    // 16 MiB of spaces inside a JSON string: about 16 KiB compressed, far under the limit.
    let mut bomb = b"{\"SendMessage\":{\"room\":\"room\",\"text\":\"".to_vec();
    bomb.resize(16 << 20, b' ');
    let compressed = deflate(&bomb);
    assert!(compressed.len() < 64 * 1024);
    client.send_frame(true, 0x41, &compressed, true).await;
    assert_eq!(client.expect_close().await, 1009);
    assert_eq!(s.service.metrics().protocol_errors, 1);
}

#[tokio::test]
async fn bad_compressed_input_is_closed() {
    let s = server(true).await;
    // Not deflate data.
    let (mut c, _) = connect(&s, "room", Some(OFFER)).await;
    c.send_frame(true, 0x41, &[0xff, 0xff, 0xff, 0xff], true)
        .await;
    assert_eq!(c.expect_close().await, 1007);
    // Deflate data that inflates to invalid UTF-8 in a text message.
    let (mut c, _) = connect(&s, "room", Some(OFFER)).await;
    c.send_frame(true, 0x41, &deflate(b"\xff\xfe not text"), true)
        .await;
    assert_eq!(c.expect_close().await, 1007);
    // RSV1 on a continuation frame.
    let (mut c, _) = connect(&s, "room", Some(OFFER)).await;
    c.send_frame(false, 0x1, b"{", true).await;
    c.send_frame(true, 0x40, b"}", true).await;
    assert_eq!(c.expect_close().await, 1002);
    // RSV1 on a control frame.
    let (mut c, _) = connect(&s, "room", Some(OFFER)).await;
    c.send_frame(true, 0x49, b"", true).await;
    assert_eq!(c.expect_close().await, 1002);
    // RSV1 without the extension agreed.
    let (mut c, _) = connect(&s, "room", None).await;
    c.send_frame(true, 0x41, &deflate(b"\"Ping\""), true).await;
    assert_eq!(c.expect_close().await, 1002);
    // The service still serves.
    let (mut c, _) = connect(&s, "room", Some(OFFER)).await;
    c.assert_nothing_pending().await;
}
